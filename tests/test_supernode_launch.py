"""osteo-client's SuperNode asks for work every ``site.poll_s`` seconds (client/supernode_launch.py, issue 11
§3) instead of Flower 1.42's hard-coded 3 s: the cap applies to every wait of the SuperNode's loop and to
nothing else, a Flower release that moves those waits fails here, and a bad setting is refused in one line."""
from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

import pytest

import flwr.supernode.start_client_internal as internal
from osteo_model.config import compose
from osteofl.client import cli as client_cli
from osteofl.client.supernode_launch import CappedClock, cap_waits


def test_flowers_supernode_loop_still_waits_through_its_time_module() -> None:
    """The tripwire for a Flower upgrade: the waits this launcher caps are where it expects them."""
    assert internal.time is time
    source = inspect.getsource(internal)
    assert "time.sleep(3)" in source and source.count("time.sleep(0.5)") == 2


def test_capped_clock_caps_only_sleeps(monkeypatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = CappedClock(0.2)
    clock.sleep(3)
    clock.sleep(0.5)
    clock.sleep(0.05)
    assert slept == [0.2, 0.2, 0.05]
    assert clock.monotonic is time.monotonic and clock.time is time.time
    with pytest.raises(ValueError, match="> 0"):
        CappedClock(0)


def test_cap_waits_changes_the_supernode_loop_only(monkeypatch) -> None:
    monkeypatch.setattr(internal, "time", time)
    cap_waits(0.25)
    assert isinstance(internal.time, CappedClock) and internal.time.cap == 0.25
    assert time.sleep is not internal.time.sleep  # the process's own time module is untouched
    monkeypatch.setattr(internal, "time", object())
    with pytest.raises(RuntimeError, match="not supported"):
        cap_waits(0.25)


def test_supernode_command_uses_the_launcher_unless_poll_is_null(tmp_path: Path) -> None:
    args = argparse.Namespace(site="site_a", superlink=None, local_port=9094, insecure=True, auth_key=None,
                              root_certificates=None)
    base = [f"paths.root={tmp_path}", "site.name=site_a"]
    fast = client_cli.supernode_command(args, compose([*base, "site.poll_s=0.2"]))
    assert fast[1:5] == ["-m", "osteofl.client.supernode_launch", "0.2", "--"] and "--superlink" in fast
    stock = client_cli.supernode_command(args, compose([*base, "site.poll_s=null"]))
    assert stock[0] == "flower-supernode" and stock[1:] == fast[5:]
    for bad in ("0", "-1"):
        with pytest.raises(client_cli.OsteoError, match="site.poll_s must be"):
            client_cli.supernode_command(args, compose([*base, f"site.poll_s={bad}"]))
