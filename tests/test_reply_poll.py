"""server/reply_poll.py: the ServerApp's short reply poll returns every reply once, stops at the timeout
with what came, and leaves the rest of the Grid as it is."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from osteo_model.errors import ConfigError
from osteofl.server.reply_poll import ShortPollGrid


class SlowGrid:
    """Answers message i on the pull numbered ``after[i]`` (never when absent)."""

    def __init__(self, after: dict[str, int]) -> None:
        self.after, self.pulls = after, 0

    def push_messages(self, messages):
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                for i in sorted(ids) if self.after.get(i) == self.pulls]

    def get_node_ids(self):
        return [7, 8]


def _msgs(*ids: str):
    return [SimpleNamespace(metadata=SimpleNamespace(message_id=i)) for i in ids]


def test_pulls_until_every_message_has_its_reply() -> None:
    grid = SlowGrid({"a": 2, "b": 4})
    replies = ShortPollGrid(grid, 1e-4).send_and_receive(_msgs("a", "b"), timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert grid.pulls == 4  # stops at the last reply, asks no more


def test_returns_what_came_when_the_timeout_passes_and_delegates_the_rest() -> None:
    grid = SlowGrid({"a": 1})  # "b" never answers: a dropped site
    replies = ShortPollGrid(grid, 1e-3).send_and_receive(_msgs("a", "b"), timeout=0.05)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"] and grid.pulls > 1
    assert ShortPollGrid(grid, 0.2).get_node_ids() == [7, 8]


@pytest.mark.parametrize("interval", [0, -1.0])
def test_refuses_a_poll_interval_that_is_not_positive(interval: float) -> None:
    with pytest.raises(ConfigError, match="reply_poll_s"):
        ShortPollGrid(SlowGrid({}), interval)
