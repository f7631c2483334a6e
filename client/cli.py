"""`osteo-client --site X [hydra overrides]`: run hospital X's SuperNode.

It dials out to the SuperLink (TLS with the federation's root certificate, authenticated by the site's
private key); the hospital opens no inbound port (the SuperNode's own runtime API listens on loopback
only, ``--local-port``). The ClientApp it runs reads the site's prepared cache and keeps the local
expert, calibration head, optimiser and privacy accountant in the site's state folder.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Sequence

from osteo_model.cache import SiteCache
from osteo_model.cli._common import run_cli
from osteo_model.config import compose_site
from osteo_model.errors import OsteoError
from osteofl import runtime
from osteofl.client.probe import superlink_mismatch
from osteofl.protocol import site_key_dir, site_key_paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osteo-client", description=__doc__.splitlines()[0])
    p.add_argument("--site", required=True, help="this hospital's site name (its keys and folders)")
    p.add_argument("--superlink", help="host:port of the SuperLink (default federation.superlink.address)")
    p.add_argument("--root-certificates", help="the federation's CA certificate (default <pki>/ca.pem)")
    p.add_argument("--auth-key", help="this site's private key (default <site.state_dir>/keys/<site>_key, osteo-keygen)")
    p.add_argument("--local-port", type=int, default=9094,
                   help="loopback port of the SuperNode's local runtime API (distinct per SuperNode on one host)")
    p.add_argument("--insecure", action="store_true", help="no TLS and no node authentication (testing only)")
    p.add_argument("--telemetry", action="store_true", help="allow Flower's usage telemetry (off by default)")
    return p


def _node_overrides(overrides: Sequence[str]) -> str:
    """The hospital's own overrides as the node config's "overrides" (TOML string): the ClientApp composes
    the site's policy and privacy floor from them (client/policy.py), never from the run config."""
    text = shlex.join(overrides)
    if '"' in text or "\\" in text:
        raise OsteoError(None, "an osteo-client override holds a double quote or a backslash; put it in site.yaml instead")
    return f' overrides="{text}"' if text else ""


def supernode_command(args: argparse.Namespace, cfg, overrides: Sequence[str] = ()) -> list[str]:
    pki = Path(cfg.paths.pki)
    node_config = (f"site='{args.site}' cache-dir='{Path(cfg.site.cache_dir).resolve()}' "
                   f"state-dir='{Path(cfg.site.state_dir).resolve()}' site-dir='{Path(cfg.site.dir).resolve()}'"
                   + _node_overrides(overrides))
    cmd = ["flower-supernode", "--superlink", args.superlink or str(cfg.federation.superlink.address),
           "--port", str(args.local_port), "--host", "127.0.0.1", "--node-config", node_config]
    if args.insecure:
        return cmd + ["--insecure"]
    key = Path(args.auth_key) if args.auth_key else site_key_paths(site_key_dir(cfg.site.state_dir), args.site)[0]
    ca = Path(args.root_certificates) if args.root_certificates else pki / "ca.pem"
    for path, what in ((ca, "root certificate missing: copy it from the coordinator (osteo-provision)"),
                       (key, f"site key missing: run `osteo-keygen --site {args.site}` here and send the .pub "
                             "to the coordinator")):
        if not path.is_file():
            raise OsteoError(path, what)
    return cmd + ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]


def serve(args: argparse.Namespace, overrides: list[str]) -> int:
    """Check the site and the SuperLink's transport, then run the SuperNode until it ends or we are stopped."""
    cfg = compose_site([*overrides, f"site.name={args.site}"])
    cache = SiteCache.open(cfg.site.cache_dir)  # fail early, in one line, if the site is not prepared
    cmd = supernode_command(args, cfg, overrides)
    address = cmd[cmd.index("--superlink") + 1]
    ca = None if args.insecure else Path(cmd[cmd.index("--root-certificates") + 1])
    mismatch = superlink_mismatch(address, ca)
    if mismatch:
        raise OsteoError(None, mismatch)
    Path(cfg.site.state_dir).mkdir(parents=True, exist_ok=True)
    env = runtime.flower_env(Path(cfg.site.state_dir) / "flwr_home", telemetry=args.telemetry)
    print(f"osteo-client: site {args.site} ({len(cache)} vertebrae) -> {address}; "
          f"{'INSECURE' if args.insecure else 'TLS + node authentication'}; {runtime.say_telemetry(args.telemetry)}",
          flush=True)
    runtime.exit_on_sigterm()
    supernode = runtime.start(cmd, env)
    try:
        return supernode.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the SuperNode, then leave without a slow teardown
        runtime.stop(supernode)
        runtime.exit_now(130)
    finally:
        runtime.stop(supernode)


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    return run_cli(lambda: serve(args, overrides))


if __name__ == "__main__":
    raise SystemExit(main())
