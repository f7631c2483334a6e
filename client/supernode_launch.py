"""`python -m osteofl.client.supernode_launch POLL_S -- [flower-supernode arguments]`: Flower's SuperNode,
asking for work every POLL_S seconds.

Flower 1.42's SuperNode sleeps 3 s whenever the SuperLink has no message for it, checks for its
ClientApp's reply every 0.5 s and retries a missing object after 1 s (osteofl/flower_waits.py). A message
therefore waited ~1.5 s on average, and a round, which waits for its slowest site, ~2.25 s at 3 sites,
twice per round, before any work started (issue 11 §3). This launcher caps those waits at POLL_S and
then runs Flower's own ``flower-supernode``; nothing else changes. The cost is more requests to the
SuperLink (1 / POLL_S per site per second while idle), hence a site setting (``site.poll_s``; null keeps
Flower's waits and starts ``flower-supernode`` itself).
"""
from __future__ import annotations

import sys

from flwr.supernode.cli.flower_supernode import flower_supernode

from osteofl.flower_waits import cap_pull_backoff, cap_supernode_loop


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] != "--":
        raise SystemExit("usage: python -m osteofl.client.supernode_launch POLL_S -- [flower-supernode arguments]")
    poll = float(argv[0])
    cap_supernode_loop(poll)
    cap_pull_backoff(poll)
    sys.argv = ["flower-supernode", *argv[2:]]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
