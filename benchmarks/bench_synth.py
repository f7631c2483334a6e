"""osteo-synth on the default config (3 sites + external): wall time and size on disk.

Environment knobs: BENCH_SYNTH_JOBS (worker processes, default all cores), BENCH_SYNTH_OVERRIDES
(space-separated Hydra overrides, e.g. "synth.labeled_per_site=10").
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time

from osteo_model.config import compose
from osteofl.simulation.synth import generate


def run() -> list[tuple[str, float, str]]:
    jobs = int(os.environ.get("BENCH_SYNTH_JOBS", 0))
    extra = os.environ.get("BENCH_SYNTH_OVERRIDES", "").split()
    with tempfile.TemporaryDirectory(prefix="osteo-bench-synth-") as root:
        cfg = compose([f"paths.root={root}", f"synth.n_jobs={jobs}", *extra])
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            summaries = generate(cfg)
        wall = time.perf_counter() - start
    studies = sum(s.studies for s in summaries)
    rows = [
        ("studies", studies, "studies"),
        (f"osteo-synth wall time, {jobs or os.cpu_count()} workers", wall, "s"),
        ("osteo-synth per study", wall / studies, "s/study"),
        ("size on disk, all sites", sum(s.bytes for s in summaries) / 1e6, "MB"),
    ]
    rows += [(f"{s.site} per study", s.bytes / s.studies / 1e6, "MB/study") for s in summaries]
    return rows
