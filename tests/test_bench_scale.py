"""bench_scale's readings of a process tree: memory counts the root and every process below it, CPU every
process below it (what they reaped included), PSS never exceeds RSS, the watched peak keeps memory a child
held only for a while, and CPU is marked each time the run's history gains a round."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_scale import TreeWatch, tree_cpu, tree_memory

MB = 1024 * 1024
HOLD = 300 * MB  # a child's touched buffer: far above the sampling noise of an idle tree
BURN = 0.5       # CPU seconds a child spends


def _child(seconds: float) -> subprocess.Popen:
    """A child that touches HOLD bytes, says so on stdout, holds them ``seconds``, then exits."""
    code = (f"import sys, time; b = bytearray({HOLD}); b[::4096] = b'x' * len(b[::4096]); "
            f"print('ready', flush=True); time.sleep({seconds})")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    return child


def _burner() -> subprocess.Popen:
    """A child whose own child spends BURN CPU seconds and is reaped by it (its time moves to the child's);
    the child says so on stdout and stays until killed."""
    burn = f"import time\\nwhile time.process_time() < {BURN}: pass"
    code = (f"import subprocess, sys, time; subprocess.run([sys.executable, '-c', '{burn}'], check=True); "
            "print('burnt', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "burnt"
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


def test_tree_cpu_counts_what_the_children_reaped() -> None:
    before = tree_cpu(os.getpid())
    child = _burner()
    try:
        spent = tree_cpu(os.getpid()) - before
    finally:
        child.kill()
        child.wait()
    assert 0.9 * BURN <= spent <= BURN + 2.0  # + two interpreters' start-up


def test_watch_keeps_the_peak_and_marks_cpu_per_round(tmp_path: Path) -> None:
    history = tmp_path / "history.json"
    with TreeWatch(history, interval=0.05, memory_every=0.1) as watch:
        start = watch.rss
        history.write_text(json.dumps([{"round": 1}]))
        time.sleep(0.3)
        _child(1.0).wait()
        burner = _burner()
        history.write_text(json.dumps([{"round": 1}, {"round": 2}]))
        time.sleep(0.3)
        burner.kill()
        burner.wait()
    assert watch.rss - start >= 0.9 * HOLD
    assert tree_memory(os.getpid())[0] < watch.rss - 0.9 * HOLD  # the child is gone, its peak stays
    assert set(watch.cpu_at_round) == {1, 2}
    assert watch.cpu_per_round(first=1) >= 0.9 * BURN
