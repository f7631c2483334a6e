"""bench_scale's memory reading: it counts every process below the root (a child's pages included), PSS
never exceeds RSS, and the sampled peak keeps memory a child held only for a while."""
from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.bench_scale import PeakMemory, tree_memory

MB = 1024 * 1024
HOLD = 300 * MB  # a child's touched buffer: far above the sampling noise of an idle tree


def _child(seconds: float) -> subprocess.Popen:
    """A child that touches HOLD bytes, says so on stdout, holds them ``seconds``, then exits."""
    code = (f"import sys, time; b = bytearray({HOLD}); b[::4096] = b'x' * len(b[::4096]); "
            f"print('ready', flush=True); time.sleep({seconds})")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    return child


def test_tree_memory_counts_the_children() -> None:
    before_rss, before_pss = tree_memory(os.getpid())
    child = _child(30)
    try:
        rss, pss = tree_memory(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert rss - before_rss >= 0.9 * HOLD and pss - before_pss >= 0.9 * HOLD  # the child's private pages
    assert pss <= rss


def test_peak_keeps_what_a_child_held_for_a_while() -> None:
    with PeakMemory(interval=0.1) as peak:
        start = peak.rss
        child = _child(1.0)
        child.wait()
    assert peak.rss - start >= 0.9 * HOLD
    assert tree_memory(os.getpid())[0] < peak.rss - 0.9 * HOLD  # the child is gone, its peak stays
