"""Scale (issue 10, item 6): the real ``osteo-sim`` federated path (``run_federated``: ``flwr run`` on a
simulation SuperLink, Flower's Ray engine) with 4 and with 16 synthetic sites on tiny random-content caches.

Runs 4, 16, 16, 4 sites (a load drifting meanwhile hits both counts alike) and reports per site count:
- the mean wall time per round (the task rounds after the first round, which also starts Ray's workers) and
  the 16/4 ratio (goal <= 4.4: the work per round grows 4x, so the fixed cost per round must not grow with
  the sites). On a 2-core machine shared with other work, wall time follows the others' load: the ratio of
  single run pairs spread from 2.6 to 6.3 in our runs, so the pairs are shown beside the mean;
- the CPU seconds per round of the processes the run started, which that load disturbs far less;
- the peak memory of the whole process tree: this process, the SuperLink, SuperExec, the simulation
  process and Ray's daemons and workers (goal <= 8 GB at 16 sites), read from ``/proc/<pid>/smaps_rollup``:
  the sum of RSS (each process's resident pages; libraries shared between processes count once per
  process, so it overstates) and the sum of PSS (shared pages split between the processes that map them:
  what the tree really holds).
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
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
OVERRIDES = ("crop.size=16", "federation.local_steps=2", "federation.ssl_rounds=1", "federation.task_rounds=4",
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


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) used by the processes below ``root``, the children they have already
    reaped included (a process's time moves to its parent's when it is reaped). Not ``root``'s own: in the
    benchmark that is the watching itself."""
    ticks = 0
    for pid in descendants(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        ticks += sum(int(f) for f in stat[stat.rindex(b")") + 2:].split()[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


class TreeWatch:
    """Watches this process's tree while the ``with`` block runs: the peak of :func:`tree_memory` (every
    ``memory_every`` seconds: smaps costs ~2 ms a process) and :func:`tree_cpu` each time the run's
    ``history.json`` gains a round (checked every ``interval`` seconds): CPU per round, which other work
    on a shared machine disturbs far less than wall time."""

    def __init__(self, history: Path, interval: float = 0.2, memory_every: float = 1.0) -> None:
        self.history, self.interval, self.memory_every = history, interval, memory_every
        self.rss = self.pss = 0
        self.cpu_at_round: dict[int, float] = {}
        self._seen: float | None = None  # history.json's mtime when last read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _memory(self) -> None:
        rss, pss = tree_memory(os.getpid())
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)

    def _rounds(self) -> None:
        try:
            mtime = self.history.stat().st_mtime
            if mtime == self._seen:
                return
            rounds = len(json.loads(self.history.read_text()))
        except (OSError, ValueError):  # not written yet, or caught mid-write: the next tick sees it
            return
        self._seen = mtime
        self.cpu_at_round.setdefault(rounds, tree_cpu(os.getpid()))

    def _watch(self) -> None:
        last_memory = 0.0
        while not self._stop.wait(self.interval):
            self._rounds()
            if time.monotonic() - last_memory >= self.memory_every:
                self._memory()
                last_memory = time.monotonic()

    def cpu_per_round(self, first: int) -> float:
        """Mean CPU seconds of the rounds after round ``first`` (NaN if fewer than two rounds were seen)."""
        seen = sorted(r for r in self.cpu_at_round if r >= first)
        if len(seen) < 2:
            return float("nan")
        return (self.cpu_at_round[seen[-1]] - self.cpu_at_round[seen[0]]) / (seen[-1] - seen[0])

    def __enter__(self) -> "TreeWatch":
        self._memory()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._rounds()


def site_names(n: int) -> list[str]:
    return [f"site_{i:02d}" for i in range(n)]


def measure(root: Path, n_sites: int) -> dict[str, float]:
    """One federated run with ``n_sites`` random-content sites under ``root``: seconds per task round after
    the first round, the run's wall and CPU time (CPU: less disturbed by other work on the machine), peak
    RSS and PSS of the process tree (bytes), the 1-min load."""
    from osteofl.simulation.sim import run_federated

    sites = site_names(n_sites)
    overrides = [f"paths.root={root}", *OVERRIDES, f"federation.sites=[{','.join(sites)}]"]
    manufacturers = list(SITES.values())
    for i, site in enumerate(sites):
        _random_cache(root / "data" / "cache" / site, site, manufacturers[i % len(manufacturers)],
                      int(compose(overrides).crop.size), n_patients=PATIENTS)
    with TreeWatch(root / "outputs" / "federated" / "history.json") as watch:
        wall = run_federated(overrides, n_sites, f"scale {n_sites}", log=lambda m: None)
    history = json.loads((root / "outputs" / "federated" / "history.json").read_text())
    if any(len(r.get("site_train") or {}) != n_sites for r in history):
        raise RuntimeError(f"{n_sites} sites: a site's update was missing in a round (see the log above)")
    seconds = np.diff([0.0, *[r["seconds"] for r in history]])
    return {"round": float(np.mean(seconds[1:])), "cpu_round": watch.cpu_per_round(first=1), "wall": wall,
            "rss": watch.rss, "pss": watch.pss, "load": os.getloadavg()[0]}


def run() -> Iterator[tuple[str, float, str]]:
    import torch

    torch.set_num_threads(1)  # as each simulated site gets one CPU
    results: dict[int, list[dict[str, float]]] = {n: [] for n in SITE_COUNTS}
    for n in (*SITE_COUNTS, *reversed(SITE_COUNTS)):  # 4, 16, 16, 4: a load that drifts hits both alike
        with tempfile.TemporaryDirectory() as tmp:
            results[n].append(measure(Path(tmp), n))
    for n, runs in results.items():
        yield f"{n} sites: time per round (wall; rounds 2+, all task rounds)", _mean(runs, "round"), "s"
        yield f"{n} sites: CPU per round, process tree (rounds 2+)", _mean(runs, "cpu_round"), "s"
        yield f"{n} sites: federated run wall time", _mean(runs, "wall"), "s"
        yield f"{n} sites: peak memory, process tree (sum of RSS)", max(r["rss"] for r in runs) / 1e9, "GB"
        yield f"{n} sites: peak memory, process tree (sum of PSS)", max(r["pss"] for r in runs) / 1e9, "GB"
        yield f"{n} sites: 1-min load average at the ends", _mean(runs, "load"), "procs"
    small, large = results[SITE_COUNTS[0]], results[SITE_COUNTS[-1]]
    ratio = f"{SITE_COUNTS[-1]} / {SITE_COUNTS[0]} sites"
    yield f"time per round {ratio} (goal <= 4.4)", _mean(large, "round") / _mean(small, "round"), "x"
    for i, (big, few) in enumerate(zip(large, small), 1):
        yield f"  the same, run pair {i} alone", big["round"] / few["round"], "x"
    yield f"CPU per round {ratio}", _mean(large, "cpu_round") / _mean(small, "cpu_round"), "x"


def _mean(runs: list[dict[str, float]], key: str) -> float:
    return float(np.mean([r[key] for r in runs]))
