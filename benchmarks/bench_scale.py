"""Scale (issue 10, item 6): the real ``osteo-sim`` federated path (``run_federated``: ``flwr run`` on a
simulation SuperLink, Flower's Ray engine) with 4 and with 16 synthetic sites on tiny random-content caches.

Reports per site count the time per round (the task rounds after the first round, which also starts Ray's
workers), the 16/4 ratio (goal <= 4.4: the work per round grows 4x, so the fixed cost per round must not
grow with the sites) and the peak memory of the whole process tree: this process, the SuperLink, SuperExec,
the simulation process and Ray's daemons and workers (goal <= 8 GB at 16 sites). Memory is read from
``/proc/<pid>/smaps_rollup``: the sum of RSS (each process's resident pages; libraries shared between
processes count once per process, so it overstates) and the sum of PSS (shared pages split between the
processes that map them: what the tree really holds).
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from benchmarks.bench_federation import SITES, _random_cache
from osteo_model.config import compose
from osteofl.keeper import descendants

SITE_COUNTS = (4, 16)
# Small enough for a few minutes on 2 busy cores; the default model, so a site's work is the real one.
# 34 patients give every split the policy's hard floor of 5 (as osteo-sim's synthetic sites): no update withheld.
PATIENTS = 34
OVERRIDES = ("crop.size=16", "federation.local_steps=2", "federation.ssl_rounds=1", "federation.task_rounds=3",
             "federation.final_eval_split=null", "site.policy.min_cohort=5")


def tree_memory(root: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes over ``root`` and every process below it."""
    rss = pss = 0
    for pid in (root, *descendants(root)):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # gone meanwhile, or a zombie
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss"):
                kib = int(value.split()[0]) * 1024
                rss, pss = (rss + kib, pss) if key == "Rss" else (rss, pss + kib)
    return rss, pss


class PeakMemory:
    """The peak of :func:`tree_memory` over this process's tree while the ``with`` block runs, sampled every
    ``interval`` seconds by a thread (reading smaps costs ~2 ms a process: keep the interval >= 0.5 s)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _sample(self) -> None:
        rss, pss = tree_memory(os.getpid())
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def site_names(n: int) -> list[str]:
    return [f"site_{i:02d}" for i in range(n)]


def measure(root: Path, n_sites: int) -> dict[str, float]:
    """One federated run with ``n_sites`` random-content sites under ``root``: seconds per task round after
    the first round, the run's wall time, peak RSS and PSS of the process tree (bytes), the 1-min load."""
    from osteofl.simulation.sim import run_federated

    sites = site_names(n_sites)
    overrides = [f"paths.root={root}", *OVERRIDES, f"federation.sites=[{','.join(sites)}]"]
    manufacturers = list(SITES.values())
    for i, site in enumerate(sites):
        _random_cache(root / "data" / "cache" / site, site, manufacturers[i % len(manufacturers)],
                      int(compose(overrides).crop.size), n_patients=PATIENTS)
    with PeakMemory() as peak:
        wall = run_federated(overrides, n_sites, f"scale {n_sites}", log=lambda m: None)
    history = json.loads((root / "outputs" / "federated" / "history.json").read_text())
    if any(len(r.get("site_train") or {}) != n_sites for r in history):
        raise RuntimeError(f"{n_sites} sites: a site's update was missing in a round (see the log above)")
    seconds = np.diff([0.0, *[r["seconds"] for r in history]])
    return {"round": float(np.mean(seconds[1:])), "wall": wall, "rss": peak.rss, "pss": peak.pss,
            "load": os.getloadavg()[0]}


def run() -> Iterator[tuple[str, float, str]]:
    import torch

    torch.set_num_threads(1)  # as each simulated site gets one CPU
    results = {}
    for n in SITE_COUNTS:
        with tempfile.TemporaryDirectory() as tmp:
            results[n] = measure(Path(tmp), n)
    for n, r in results.items():
        yield f"{n} sites: time per round (rounds 2+, all task rounds)", r["round"], "s"
        yield f"{n} sites: federated run wall time", r["wall"], "s"
        yield f"{n} sites: peak memory, process tree (sum of RSS)", r["rss"] / 1e9, "GB"
        yield f"{n} sites: peak memory, process tree (sum of PSS)", r["pss"] / 1e9, "GB"
        yield f"{n} sites: 1-min load average at the end", r["load"], "procs"
    small, large = results[SITE_COUNTS[0]], results[SITE_COUNTS[-1]]
    yield f"time per round {SITE_COUNTS[-1]} / {SITE_COUNTS[0]} sites (goal <= 4.4)", large["round"] / small["round"], "x"
