"""`osteo-provision [--sites a,b,c] [--register] [hydra overrides]`: set up a federation's keys.

Creates (or keeps, when present) the CA, the SuperLink's TLS certificate with the configured SANs
(``federation.superlink.san``) and every site's EC P-384 key pair under ``paths.pki``; ``--register``
also registers the sites' public keys with a running SuperLink (``flower-server`` does this itself at
start). Prints what to hand to each hospital.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from osteo_model.cli._common import run_cli
from osteo_model.config import compose
from osteofl import runtime
from osteofl.server import provision
from osteofl.server.cli import CONNECTION, absolute_overrides, write_connection


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osteo-provision", description=__doc__.splitlines()[0])
    p.add_argument("--sites", help="comma-separated site names (default federation.sites)")
    p.add_argument("--register", action="store_true", help="register the keys with the running SuperLink")
    args, overrides = p.parse_known_args(argv)

    def body() -> None:
        cfg = compose(absolute_overrides(overrides))
        sites = args.sites.split(",") if args.sites else [str(s) for s in cfg.federation.sites]
        paths = provision.provision(cfg.paths.pki, sites, cfg.federation.superlink.san)
        pki = Path(cfg.paths.pki)
        print(f"osteo-provision: {pki}: CA {paths['ca'].name}, server certificate for "
              f"{', '.join(provision.server_sans(pki))}")
        for site in sites:
            print(f"  {site}: give the hospital {paths['ca']} and {paths[f'{site}_key']} "
                  f"(register {paths[f'{site}_pub'].name})")
        if args.register:
            flwr_home = Path(cfg.paths.outputs) / "superlink" / "flwr_home"
            write_connection(flwr_home, cfg, insecure=False)
            database = (Path(cfg.paths.outputs) / "superlink" / "state.db").resolve()
            ids = provision.register_sites(pki, sites, CONNECTION, runtime.flower_env(flwr_home), str(database))
            print("registered: " + ", ".join(f"{s} (node {n or 'known'})" for s, n in ids.items()))

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
