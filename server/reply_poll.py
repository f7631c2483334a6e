"""Collect a round's replies with a short poll.

Flower 1.42's deployed Grid (``GrpcGrid.send_and_receive``) pulls replies every 3 s, its simulation Grid
every 0.1 s: a deployed round waited up to 3 s after the last site had answered, twice per round (train,
evaluate). Pulling is one small request to the SuperLink, so polling every ``federation.reply_poll_s``
costs little and makes a deployed round wait as a simulated one does (issue 11 §3).
"""
from __future__ import annotations

import time
from typing import Any, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from osteo_model.errors import ConfigError


class ShortPollGrid:
    """``grid`` with ``send_and_receive`` polling every ``interval`` s; everything else is ``grid``'s own."""

    def __init__(self, grid: Grid, interval: float) -> None:
        if not interval > 0:
            raise ConfigError(None, f"federation.reply_poll_s={interval!r}: a positive number of seconds")
        self._grid, self.interval = grid, float(interval)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages``, then pull until every one has its reply or ``timeout`` s have passed (None: wait)."""
        waiting = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            got = list(self._grid.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.interval)
        return replies
