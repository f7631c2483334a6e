"""Flower 1.42's fixed waits, shortened in the processes we run (issue 11 §3).

A deployed message crossed several of Flower's own waits, none of them configurable:
- the SuperNode sleeps 3 s whenever the SuperLink has no message for it and checks for its ClientApp's
  reply every 0.5 s (``flwr/supernode/start_client_internal.py``);
- a process that pulls a message's objects (ServerApp, SuperNode, ClientApp) retries an object that is
  not there yet after 1 s, then 2 s, 4 s ... (``pull_objects``' ``initial_backoff``). It is often not
  there yet: a SuperNode makes a message visible to its ClientApp before it has pulled the message's
  objects, and a site's reply is visible to the ServerApp before all of its objects are pushed. Measured:
  1-1.6 s lost in most rounds, at the server and at whichever site raced.
Both are changed through the module attributes and keyword defaults Flower reads at call time, only in
our own processes (osteo-client's SuperNode and fork server, our ServerApp); nothing else changes.
tests/test_flower_waits.py fails if a Flower release moves them.
"""
from __future__ import annotations

import time
import types
from typing import Any

import flwr.supercore.inflatable.inflatable_utils as inflatable
import flwr.supernode.start_client_internal as supernode_loop

PULLERS = (inflatable.pull_objects, inflatable.pull_and_inflate_object_from_tree)


class CappedClock:
    """The ``time`` module with every ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        if not cap > 0:
            raise ValueError(f"poll interval must be > 0 s, got {cap}")
        self.cap = float(cap)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_supernode_loop(poll_s: float) -> None:
    """Make the SuperNode's loop (only that module) wait at most ``poll_s`` between its checks."""
    if not isinstance(supernode_loop.time, (types.ModuleType, CappedClock)):
        raise RuntimeError("flwr.supernode.start_client_internal no longer waits through `time`: "
                           "this Flower release is not supported by osteofl.flower_waits")
    supernode_loop.time = CappedClock(poll_s)


def cap_pull_backoff(first_retry_s: float) -> None:
    """Retry an object that is not there yet after ``first_retry_s`` (doubling from there, as Flower does),
    instead of after 1 s, wherever Flower pulls objects without naming a backoff."""
    if not first_retry_s > 0:
        raise ValueError(f"first retry must be > 0 s, got {first_retry_s}")
    for fn in PULLERS:
        defaults = fn.__kwdefaults__ or {}
        if "initial_backoff" not in defaults:
            raise RuntimeError(f"flwr's {fn.__qualname__} has no initial_backoff default any more: "
                               "this Flower release is not supported by osteofl.flower_waits")
        defaults["initial_backoff"] = min(float(defaults["initial_backoff"]), float(first_retry_s))
