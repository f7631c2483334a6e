"""`osteo-sim`'s federated run goes through flwr 1.42's supported simulation path (``flwr run`` on a
SuperLink in simulation mode, not the deprecated ``run_simulation``) and leaves nothing behind: every
process it started (SuperLink, SuperExec, the simulation process, Ray's workers and daemons) is gone when
it returns."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from federation_helpers import SITES, allow_small_cohorts, make_caches, small_overrides
from osteofl.keeper import descendants
from osteofl.simulation.sim import run_federated
from test_processes import alive, wait_gone


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_federated_simulation_uses_flwr_run_and_leaves_no_process(tmp_path: Path) -> None:
    make_caches(tmp_path)
    allow_small_cohorts(tmp_path)
    overrides = small_overrides(tmp_path, **{"paths.outputs": tmp_path / "out", "federation.final_eval_split": "null",
                                             "federation.round_timeout": 600})
    seen: dict[int, str] = {}
    done = threading.Event()
    before = set(descendants(os.getpid()))  # e.g. multiprocessing's resource tracker, left by an earlier test

    def watch() -> None:  # what the run spawned, sampled while it runs
        while not done.wait(0.3):
            for pid in set(descendants(os.getpid())) - before:
                seen.setdefault(pid, _cmdline(pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_federated(overrides, len(SITES), "test", lambda _: None)
    finally:
        done.set()
        watcher.join()
    commands = " ".join(seen.values())
    assert "flower-superlink" in commands and "--simulation" in commands and "flwr run" in commands, commands
    assert "ray" in commands.lower(), commands  # the simulation engine's workers were seen ...
    assert wait_gone(list(seen), 10) == [], [seen[p] for p in alive(list(seen))]  # ... and none survives
    history = json.loads((tmp_path / "out" / "federated" / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2] and all(set(r["site_train"]) == set(SITES) for r in history)
