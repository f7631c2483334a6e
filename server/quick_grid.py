"""The run's Grid with a short reply poll.

Flower's ``Grid.send_and_receive`` waits 3 s between pulls for replies: a deployed round paid up to that
twice (train, evaluate) on top of the sites' own work (issue 11 §3). The same push and pull, polled every
``POLL_S``; everything else is the Grid's own.
"""
from __future__ import annotations

import time
from typing import Any, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

POLL_S = 0.2


class QuickGrid:
    """Wraps a Flower Grid; only ``send_and_receive`` differs (same arguments, same result)."""

    def __init__(self, grid: Grid, poll: float = POLL_S) -> None:
        self._grid = grid
        self._poll = poll

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages``; pull their replies until all came or ``timeout`` seconds passed."""
        pending = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self._poll)
        return replies
