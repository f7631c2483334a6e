"""`osteo-provision [--sites a,b,c] [--site-key SITE=FILE ...] [--generate-site-keys] [--register] [hydra overrides]`:
the coordinating site's keys and certificates.

Creates (or keeps, when present) the CA and the SuperLink's TLS certificate with the configured SANs
(``federation.superlink.san``) under ``paths.pki``, and registers the PUBLIC keys the hospitals sent
(``--site-key site_a=site_a_key.pub``, made at the hospital by ``osteo-keygen``): it never holds a site's
private key. ``--generate-site-keys`` is the one-machine convenience for tests and simulation: it plays
each hospital, writing each site's key pair into that site's own state folder (where ``osteo-client``
looks) and registering the public half. ``--register`` also registers the keys with a running SuperLink
(``flower-server`` does this itself at start). Prints each site's key fingerprint to compare with the
one ``osteo-keygen`` printed at the hospital.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from osteo_model.cli._common import run_cli
from osteo_model.config import compose, compose_site
from osteo_model.errors import ConfigError
from osteofl import keys, runtime
from osteofl.protocol import site_key_dir
from osteofl.server import provision
from osteofl.server.cli import CONNECTION, absolute_overrides, write_connection


def _site_key_arg(text: str) -> tuple[str, Path]:
    site, sep, path = text.partition("=")
    if not sep or not site or not path:
        raise argparse.ArgumentTypeError(f"expected SITE=PATH/TO/SITE_key.pub, got {text!r}")
    return site, Path(path)


def generate_site_keys(overrides: list[str], sites: list[str]) -> dict[str, Path]:
    """Convenience (one machine): each site's key pair in its own state folder, as ``osteo-keygen`` makes it
    there; returns site -> public key file."""
    out = {}
    for site in sites:
        cfg = compose_site([*overrides, f"site.name={site}"])
        _, out[site] = keys.make_site_key(site_key_dir(cfg.site.state_dir), site)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osteo-provision", description=__doc__.splitlines()[0])
    p.add_argument("--sites", help="comma-separated site names (default federation.sites)")
    p.add_argument("--site-key", action="append", default=[], type=_site_key_arg, metavar="SITE=FILE",
                   help="register the public key a hospital sent (repeatable)")
    p.add_argument("--generate-site-keys", action="store_true",
                   help="one machine only (tests, simulation): make each site's key pair in its own state folder")
    p.add_argument("--register", action="store_true", help="register the keys with the running SuperLink")
    args, overrides = p.parse_known_args(argv)

    def body() -> None:
        overrides_abs = absolute_overrides(overrides)
        cfg = compose(overrides_abs)
        sites = args.sites.split(",") if args.sites else [str(s) for s in cfg.federation.sites]
        pki = Path(cfg.paths.pki)
        sent = dict(args.site_key)
        unknown = sorted(set(sent) - set(sites))
        if unknown:
            raise ConfigError(None, f"--site-key for {unknown}, not in the federation's sites {sites} "
                                    "(federation.sites or --sites)")
        if args.generate_site_keys:
            sent = {**generate_site_keys(overrides_abs, sites), **sent}
        for site, path in sent.items():
            provision.register_public_key(pki, site, path)
        paths = provision.provision(pki, sites, cfg.federation.superlink.san)
        print(f"osteo-provision: {pki}: CA {paths['ca'].name}, server certificate for "
              f"{', '.join(provision.server_sans(pki))}; give every hospital {paths['ca']}")
        fingerprints = provision.public_keys(pki)
        for site in sites:
            if site in fingerprints:
                print(f"  {site}: registered public key {fingerprints[site]} ({paths[f'{site}_pub']})")
            else:
                print(f"  {site}: no public key yet: the hospital runs `osteo-keygen --site {site}` and sends "
                      f"its .pub; then `osteo-provision --site-key {site}=<file>`")
        for stray in sorted((pki / "sites").glob("*/*_key")):
            print(f"  WARNING: {stray} is a site's PRIVATE key (older layout): it belongs at the hospital "
                  "only; move it there and delete it here")
        if args.register:
            flwr_home = Path(cfg.paths.outputs) / "superlink" / "flwr_home"
            write_connection(flwr_home, cfg, insecure=False)
            database = (Path(cfg.paths.outputs) / "superlink" / "state.db").resolve()
            ids = provision.register_sites(pki, sites, CONNECTION, runtime.flower_env(flwr_home), str(database))
            print("registered: " + ", ".join(f"{s} (node {n or 'known'})" for s, n in ids.items()))

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
