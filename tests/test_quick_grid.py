"""QuickGrid: Flower's push and pull with a short poll, the same result as Grid.send_and_receive."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from osteofl.server import quick_grid
from osteofl.server.quick_grid import QuickGrid


class SlowLink:
    """A Grid whose reply to message i shows up at its ``ready[i]``-th pull; i = -1 never answers."""

    def __init__(self, ready: list[int]) -> None:
        self.ready = ready
        self.pulls = 0

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
                for i, at in enumerate(self.ready) if at == self.pulls and f"m{i}" in ids]

    def get_node_ids(self):
        return [1, 2, 3]


def test_replies_are_collected_across_pulls_with_the_short_poll(monkeypatch) -> None:
    naps: list[float] = []
    monkeypatch.setattr(quick_grid.time, "sleep", naps.append)
    link = SlowLink([1, 3, 2])
    got = QuickGrid(link).send_and_receive(["a", "b", "c"], timeout=60)
    assert sorted(m.metadata.reply_to_message_id for m in got) == ["m0", "m1", "m2"]
    assert link.pulls == 3 and naps == [quick_grid.POLL_S] * 2
    assert QuickGrid(link).get_node_ids() == [1, 2, 3]  # everything else is the Grid's own


def test_a_site_that_never_answers_is_left_behind_at_the_timeout(monkeypatch) -> None:
    clock = iter(range(0, 10_000, 1))
    monkeypatch.setattr(quick_grid.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(quick_grid.time, "sleep", lambda s: None)
    link = SlowLink([1, -1])
    got = QuickGrid(link).send_and_receive(["a", "b"], timeout=5)
    assert [m.metadata.reply_to_message_id for m in got] == ["m0"] and 3 <= link.pulls <= 6


@pytest.mark.parametrize("ready", [[], [1]])
def test_nothing_pending_returns_at_once(ready, monkeypatch) -> None:
    monkeypatch.setattr(quick_grid.time, "sleep", lambda s: pytest.fail("slept with nothing pending"))
    link = SlowLink(ready)
    assert len(QuickGrid(link).send_and_receive(["x"] * len(ready), timeout=1)) == len(ready)
