"""``osteo-prepare --site X [hydra overrides]``: a site folder -> its prepared cache."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from osteo_model.cli._common import run_cli
from osteo_model.config import compose_site


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="osteo-prepare",
        description="Validate a site folder, crop L1-L4 vertebral bodies, extract radiomics, write the site cache. "
        "Other arguments are Hydra overrides, e.g. site.dir=/data/hospital site.cache_dir=/data/cache crop.size=64.",
    )
    parser.add_argument("--site", help="site name (sets site.name; site.dir and site.cache_dir follow from it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args, overrides = parser.parse_known_args(argv)
    if args.site:
        overrides = [f"site.name={args.site}", *overrides]

    def body() -> None:
        from osteo_model.prepare import prepare_site  # heavy imports after argument errors

        prepare_site(compose_site(overrides), progress=not args.no_progress)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
