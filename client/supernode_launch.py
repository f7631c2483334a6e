"""`python -m osteofl.client.supernode_launch POLL_S -- [flower-supernode arguments]`: Flower's SuperNode,
asking for work every POLL_S seconds.

Flower 1.42's SuperNode sleeps 3 s whenever the SuperLink has no message for it and checks for its
ClientApp's reply every 0.5 s (``flwr/supernode/start_client_internal.py``; neither is configurable).
A message therefore waited ~1.5 s on average, and a round, which waits for its slowest site, ~2.25 s
at 3 sites, twice per round, before any work started (issue 11 §3). This launcher caps those waits of
that one module at POLL_S and then runs Flower's own ``flower-supernode``; nothing else changes. The
cost is more requests to the SuperLink (1 / POLL_S per site per second while idle), hence a site
setting (``site.poll_s``; null keeps Flower's waits and starts ``flower-supernode`` itself).
tests/test_supernode_launch.py fails if a Flower release moves these waits.
"""
from __future__ import annotations

import sys
import time
import types
from typing import Any

import flwr.supernode.start_client_internal as internal
from flwr.supernode.cli.flower_supernode import flower_supernode


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


def cap_waits(poll_s: float) -> None:
    """Make the SuperNode's loop (only that module) wait at most ``poll_s`` between its checks."""
    if not isinstance(internal.time, (types.ModuleType, CappedClock)):
        raise RuntimeError("flwr.supernode.start_client_internal no longer waits through `time`: "
                           "this Flower release is not supported by osteofl.client.supernode_launch")
    internal.time = CappedClock(poll_s)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] != "--":
        raise SystemExit("usage: python -m osteofl.client.supernode_launch POLL_S -- [flower-supernode arguments]")
    cap_waits(float(argv[0]))
    sys.argv = ["flower-supernode", *argv[2:]]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
