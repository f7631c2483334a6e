"""`osteo-synth`: write the synthetic sites and their hidden truth (Hydra overrides, e.g. synth.labeled_per_site=10)."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from osteo_model.cli._common import run_cli
from osteo_model.config import compose
from osteofl.simulation.synth import generate


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="osteo-synth",
        description="Write synthetic hospital sites (CT, vertebra labels, DXA) and their hidden ground truth. "
        "Other arguments are Hydra overrides, e.g. synth.labeled_per_site=10 synth.sites=[site_a,site_b] seed=3.",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, overrides = parser.parse_known_args(argv)
    start = time.perf_counter()

    def body() -> None:
        cfg = compose(overrides)
        summaries = generate(cfg, progress=not args.no_progress)
        print(f"osteo-synth: seed {cfg.synth.seed}, sites in {cfg.paths.sites_root}, truth in {cfg.paths.ground_truth}")
        for s in summaries:
            prev = ", ".join(f"{k} {v:.0%}" for k, v in s.prevalence.items())
            print(f"  {s.site:<10} {s.role:<8} {s.studies:4d} studies: {s.with_dxa} with DXA ({s.paired} within "
                  f"{cfg.site.max_dxa_interval_days} d), {s.studies - s.paired} unlabeled; {s.bytes / 1e6:.1f} MB; "
                  f"DXA-paired prevalence: {prev}")
        total = sum(s.studies for s in summaries)
        print(f"  {total} studies, {sum(s.bytes for s in summaries) / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
