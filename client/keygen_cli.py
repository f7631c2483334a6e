"""`osteo-keygen --site X [--out DIR] [hydra overrides]`: the hospital makes its own authentication key.

Writes the site's EC P-384 key pair into the site's own state folder (``<site.state_dir>/keys/``, 0700;
the private key 0600), where ``osteo-client`` looks for it. The private key never leaves the hospital;
send the printed public key (the ``.pub`` file) to the coordinator and compare the fingerprint that
``osteo-provision`` shows after registering it. Re-running keeps an existing key.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from osteo_model.cli._common import run_cli
from osteo_model.config import compose_site
from osteofl import keys
from osteofl.protocol import site_key_dir, site_key_paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osteo-keygen", description=__doc__.splitlines()[0])
    p.add_argument("--site", required=True, help="this hospital's site name (as the coordinator registers it)")
    p.add_argument("--out", help="folder for the key pair (default <site.state_dir>/keys)")
    args, overrides = p.parse_known_args(argv)

    def body() -> None:
        folder = Path(args.out) if args.out else site_key_dir(
            compose_site([*overrides, f"site.name={args.site}"]).site.state_dir)
        existed = site_key_paths(folder, args.site)[0].exists()
        private, public = keys.make_site_key(folder, args.site)
        key = keys.load_public_key(public)
        print(f"osteo-keygen: site {args.site}: {'kept the existing' if existed else 'new'} key pair; private key "
              f"{private} (0600, never send it)")
        print(f"public key ({public}), send this file to the coordinator:")
        print(keys.public_line(key, args.site).decode().rstrip())
        print(f"fingerprint: {keys.fingerprint(key)}")

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
