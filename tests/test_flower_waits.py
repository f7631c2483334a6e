"""Flower 1.42's fixed waits, shortened in our own processes (osteofl/flower_waits.py, issue 11 §3): the
SuperNode's loop asks every ``site.poll_s`` seconds and object pulls retry sooner; each cap changes only
what it names, a Flower release that moves these waits fails here, and a bad setting is refused in one line."""
from __future__ import annotations

import argparse
import inspect
import threading
import time
from pathlib import Path

import pytest

import flwr.supercore.inflatable.inflatable_utils as inflatable
import flwr.supernode.start_client_internal as supernode_loop
from osteo_model.config import compose
from osteofl import flower_waits
from osteofl.client import cli as client_cli
from osteofl.flower_waits import CappedClock, cap_pull_backoff, cap_supernode_loop


def test_flowers_waits_are_where_we_shorten_them() -> None:
    """The tripwire for a Flower upgrade."""
    assert supernode_loop.time is time or isinstance(supernode_loop.time, CappedClock)
    source = inspect.getsource(supernode_loop)
    assert "time.sleep(3)" in source and source.count("time.sleep(0.5)") == 2
    for fn in flower_waits.PULLERS:
        assert "initial_backoff" in inspect.signature(fn).parameters
        assert inspect.signature(fn).parameters["initial_backoff"].kind is inspect.Parameter.KEYWORD_ONLY


def test_capped_clock_caps_only_sleeps(monkeypatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = CappedClock(0.2)
    for seconds in (3, 0.5, 0.05):
        clock.sleep(seconds)
    assert slept == [0.2, 0.2, 0.05]
    assert clock.monotonic is time.monotonic and clock.time is time.time
    with pytest.raises(ValueError, match="> 0"):
        CappedClock(0)


def test_cap_supernode_loop_changes_that_module_only(monkeypatch) -> None:
    monkeypatch.setattr(supernode_loop, "time", time)
    cap_supernode_loop(0.25)
    assert isinstance(supernode_loop.time, CappedClock) and supernode_loop.time.cap == 0.25
    assert time.sleep is not supernode_loop.time.sleep  # the process's own time module is untouched
    monkeypatch.setattr(supernode_loop, "time", object())
    with pytest.raises(RuntimeError, match="not supported"):
        cap_supernode_loop(0.25)


def test_pull_retries_sooner_and_still_gets_the_object(monkeypatch) -> None:
    """An object that appears only on the 3rd try: with the cap, the two waits are 0.1 and 0.2 s (±20 %
    jitter), not Flower's 1 and 2 s; the object arrives either way."""
    for fn in flower_waits.PULLERS:
        monkeypatch.setitem(fn.__kwdefaults__, "initial_backoff", fn.__kwdefaults__["initial_backoff"])
    waits: list[float] = []

    class RecordingEvent(threading.Event):
        """Records a retry's wait instead of sleeping it."""

        def wait(self, timeout: float | None = None) -> bool:
            if timeout is None:
                return super().wait()
            waits.append(timeout)
            return self.is_set()

    monkeypatch.setattr(inflatable.threading, "Event", RecordingEvent)
    tries = {"n": 0}

    def pull(object_id: str) -> bytes:
        tries["n"] += 1
        if tries["n"] < 3:
            raise inflatable.ObjectUnavailableError(object_id)
        return b"content"

    assert inflatable.pull_objects(["x"], pull) == {"x": b"content"}
    assert [round(w) for w in waits] == [1, 2]  # Flower's own backoff
    waits.clear()
    tries["n"] = 0
    cap_pull_backoff(0.1)
    assert inflatable.pull_objects(["x"], pull) == {"x": b"content"}
    assert 0.08 <= waits[0] <= 0.12 and 0.16 <= waits[1] <= 0.24
    assert inflatable.pull_and_inflate_object_from_tree.__kwdefaults__["initial_backoff"] == 0.1
    cap_pull_backoff(5.0)  # never longer than Flower's own
    assert inflatable.pull_objects.__kwdefaults__["initial_backoff"] == 0.1
    with pytest.raises(ValueError, match="> 0"):
        cap_pull_backoff(0)


def test_supernode_command_uses_the_launcher_unless_poll_is_null(tmp_path: Path) -> None:
    args = argparse.Namespace(site="site_a", superlink=None, local_port=9094, insecure=True, auth_key=None,
                              root_certificates=None)
    base = [f"paths.root={tmp_path}", "site.name=site_a"]
    fast_cfg = compose([*base, "site.poll_s=0.2"])
    fast = client_cli.supernode_command(args, fast_cfg)
    assert fast[1:5] == ["-m", "osteofl.client.supernode_launch", "0.2", "--"] and "--superlink" in fast
    assert client_cli.fork_server_command(tmp_path / "s", fast_cfg)[-2:] == ["--first-retry", "0.2"]
    stock_cfg = compose([*base, "site.poll_s=null"])
    stock = client_cli.supernode_command(args, stock_cfg)
    assert stock[0] == "flower-supernode" and stock[1:] == fast[5:]
    assert "--first-retry" not in client_cli.fork_server_command(tmp_path / "s", stock_cfg)
    for bad in ("0", "-1"):
        with pytest.raises(client_cli.OsteoError, match="site.poll_s must be"):
            client_cli.supernode_command(args, compose([*base, f"site.poll_s={bad}"]))
