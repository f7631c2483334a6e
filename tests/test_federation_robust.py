"""What one registered site can do to the global model (server/robust.py, issue 11 §1) and the round's
record of who did not answer (§4): unit tests of the bounds, then attacks through the real ServerApp and
ClientApp on LocalGrid."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam
from flwr.supercore.task_identity import TaskIdentity

from federation_helpers import make_caches
from osteo_model.config import compose
from osteo_model.errors import ConfigError
from osteofl import protocol
from osteofl.server import checkpoint as ckpt
from osteofl.server import robust
from osteofl.server.strategies import build_strategy, restore_strategy_state
from test_federation_rounds import _federation

ON = robust.RobustConfig(max_update_norm=3.0, reject_update_norm=10.0, max_global_change=1.0)

pytestmark = pytest.mark.usefixtures("task_identity")


def _arrays(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (scale * rng.normal(size=shape)).astype(np.float32) for k, shape in (("w", (4, 5)), ("b", (3,)))}


def test_huge_update_is_rejected_and_flipped_one_clipped_to_the_median_bound() -> None:
    rng = np.random.default_rng(0)
    base = _arrays(rng)
    honest = {s: {k: v + d for (k, v), d in zip(base.items(), _arrays(rng, 0.01).values())} for s in ("a", "b")}
    delta = _arrays(rng, 0.01)
    updates = {**honest,
               "flip": {k: base[k] - 10 * delta[k] for k in base},    # x10 sign-flipped
               "huge": {k: v * np.float32(1e20) for k, v in honest["a"].items()}}  # finite, so screening passes it
    out = robust.bound_updates(updates, base, ON)
    assert [r["site"] for r in out.rejected] == ["huge"] and out.rejected[0]["ratio"] > 1e19
    assert [c["site"] for c in out.clipped] == ["flip"] and out.clipped[0]["ratio"] > 3
    reference = max(robust.change_norm(honest[s], base) for s in ("a", "b"))  # middle of a, b, flip
    assert robust.change_norm(out.updates["flip"], base) == pytest.approx(3 * reference, rel=1e-4)
    flipped_direction = out.updates["flip"]["w"] - base["w"]
    assert np.dot(flipped_direction.ravel(), -delta["w"].ravel()) > 0  # clipped, not redirected
    for s in ("a", "b"):  # honest ones pass untouched, same dtype
        assert all(np.array_equal(out.updates[s][k], honest[s][k]) and out.updates[s][k].dtype == np.float32
                   for k in base)


def test_the_median_reference_cannot_be_raised_by_one_of_two_sites() -> None:
    base = {"w": np.ones(8, np.float32)}
    small = {"w": base["w"] + 0.01}
    big = {"w": base["w"] + 5.0}  # within the hard limit, but 500 x the other change
    out = robust.bound_updates({"a": small, "b": big}, base, ON)
    assert [c["site"] for c in out.clipped] == ["b"]
    assert robust.change_norm(out.updates["b"], base) == pytest.approx(3 * robust.change_norm(small, base), rel=1e-4)


def test_an_update_that_changed_nothing_is_no_reference_for_the_others() -> None:
    """The audit's c_zero_change: with two sites the lower median is the smaller change, so a site returning the
    global arrays unchanged (a liar, or an honest site at lr 0) had the other clipped to nothing (ratio inf)."""
    base = {"w": np.ones(8, np.float32)}
    moved = {"w": base["w"] + 0.01}
    out = robust.bound_updates({"a": moved, "b": dict(base)}, base, ON)
    assert out.clipped == [] and np.array_equal(out.updates["a"]["w"], moved["w"])
    assert robust.bound_updates({"a": dict(base), "b": dict(base)}, base, ON).clipped == []  # nothing moved: nothing to do


def test_weight_and_change_cannot_multiply_into_one_sites_steering() -> None:
    """The audit's g_combined_flip: one site of three weighted 3 x (a huge claimed pool, capped) and sending its
    change sign-flipped at 2.95 x the median change passed both bounds and pulled 8.9 x as hard as a typical
    site. bound_pulls clips it to 3 x the median pull (weight x change); equal weights clip nothing more."""
    rng = np.random.default_rng(1)
    base = _arrays(rng)
    honest = {s: {k: v + d for (k, v), d in zip(base.items(), _arrays(rng, 0.01).values())} for s in ("a", "b")}
    median = sorted(robust.change_norm(honest[s], base) for s in honest)[0]
    own = _arrays(rng, 0.01)
    scale = 2.95 * median / robust.norm(own)
    evil = {k: (base[k] - scale * own[k]).astype(np.float32) for k in base}
    updates = {**honest, "c": evil}
    assert robust.bound_updates(updates, base, ON).clipped == []  # each bound alone lets it through
    weights = {"a": 100.0, "b": 100.0, "c": 300.0}
    out = robust.bound_pulls(updates, base, weights, ON)
    before = {s: weights[s] * robust.change_norm(updates[s], base) for s in updates}
    middle = sorted(before.values())[1]  # the lower median of three: the larger honest pull
    assert [c["site"] for c in out.clipped] == ["c"] and out.clipped[0]["ratio"] == pytest.approx(before["c"] / middle)
    assert before["c"] / middle > 5  # 3 x 2.95, less the honest sites' spread
    pull = {s: weights[s] * robust.change_norm(out.updates[s], base) for s in updates}
    assert pull["c"] == pytest.approx(3 * middle, rel=1e-3) and all(pull[s] == before[s] for s in ("a", "b"))
    assert robust.bound_pulls(updates, base, {s: 1.0 for s in updates}, ON).clipped == []


def test_aggregation_weights_cannot_be_inflated() -> None:
    claimed = {"a": 1e12, "b": 20.0, "c": 7.0}
    assert robust.aggregation_weights(claimed, {"a": 30, "b": 40, "c": 7}, "capped") == {"a": 30, "b": 20, "c": 7}
    # a size withheld (small cohort) or never reported: at most the smallest known size
    assert robust.aggregation_weights(claimed, {"a": "withheld", "b": 40, "c": 9}, "capped")["a"] == 9
    assert robust.aggregation_weights(claimed, {"a": None}, "capped") == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert robust.aggregation_weights(claimed, {"a": 30, "b": 40, "c": 7}, "equal") == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_no_weight_exceeds_max_weight_ratio_times_the_lower_median() -> None:
    """The handshake's size is the site's own claim: one that reports 1e9 still weighs 3 x a typical site."""
    claimed = {"a": 100.0, "b": 120.0, "liar": 1e9}
    caps = {"a": 100, "b": 120, "liar": 1e9}
    assert robust.aggregation_weights(claimed, caps, "capped", 3.0) == {"a": 100, "b": 120, "liar": 360}
    assert robust.aggregation_weights(claimed, caps, "capped", None)["liar"] == 1e9  # off
    # two sites: the lower median is the smaller, so the larger weighs at most 3 x it
    assert robust.aggregation_weights({"a": 10.0, "b": 50.0}, {"a": 10, "b": 50}, "capped", 3.0) == {"a": 10, "b": 30}


def test_aggregate_problem_refuses_non_finite_and_exploded() -> None:
    old = {"w": np.ones(4, np.float32)}
    assert robust.aggregate_problem(old, {"w": old["w"] * 1.1}, 1.0) is None
    assert "non-finite" in robust.aggregate_problem(old, {"w": np.array([1, np.nan, 1, 1], np.float32)}, None)
    assert "max_global_change" in robust.aggregate_problem(old, {"w": old["w"] * 1e20}, 1.0)
    assert "max_global_change" in robust.aggregate_problem(old, {"w": -old["w"]}, 1.0)  # a flipped model too


@pytest.mark.parametrize("key,value", [("max_update_norm", 0), ("reject_update_norm", -1.0),
                                       ("max_global_change", math.inf), ("weights", "claimed"),
                                       ("max_weight_ratio", -3)])
def test_robust_config_refuses_nonsense(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        robust.RobustConfig.from_cfg({"max_update_norm": 3.0, key: value})


def _train_reply(node: int, w: float) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(2, w, np.float32))}),
                               "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)


@pytest.mark.parametrize("name,args,sites,ok", [
    ("fedtrimmedavg", "beta=0.2", 3, False),  # int(0.2 * 3) = 0: would trim nothing
    ("fedtrimmedavg", "beta=0.4", 3, True),
    ("fedmedian", "", 2, False),              # a median of two is their mean
    ("fedmedian", "", 3, True),
])
def test_robust_strategies_really_trim_at_three_sites_or_are_refused(name, args, sites, ok, tmp_path: Path) -> None:
    overrides = [f"paths.root={tmp_path}", f"federation.strategy={name}", f"federation.min_available_nodes={sites}"]
    overrides += [f"federation.strategy_args.{name}.{args}"] if args else []
    cfg = compose(overrides)
    if not ok:
        with pytest.raises(ConfigError, match="leaves no update out"):
            build_strategy(cfg)
        return
    arrays, _ = build_strategy(cfg).aggregate_train(1, [_train_reply(1, 1.0), _train_reply(2, 2.0),
                                                        _train_reply(3, 1e20)])
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0])  # the 1e20 update is left out


def test_a_refused_aggregate_can_roll_back_fedadams_moments() -> None:
    adam = FedAdam()
    restore_strategy_state(adam, {})  # the state before the first aggregation
    adam.m_t, adam.v_t = {"w": np.ones(2)}, {"w": np.ones(2)}  # what a refused round left behind
    restore_strategy_state(adam, {})
    assert adam.m_t is None and adam.v_t is None


# --- through the real ServerApp / ClientApp ---------------------------------------------------------------
@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_caches(tmp_path)


def _attack(grid, attacks) -> dict[str, dict]:
    """Let ``attacks[site](update, global) -> update`` rewrite a site's train reply; returns each site's
    honest change (captured before any aggregation can consume the reply)."""
    original, honest = grid.send_and_receive, {}

    def send(messages, timeout=None):
        messages = list(messages)
        sent = {m.metadata.dst_node_id: m for m in messages if m.content.array_records}
        replies = original(messages, timeout=timeout)
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in sent or reply.has_error() or not reply.content.array_records:
                continue  # not a train reply
            site = grid.nodes[node]
            base, update = protocol.payload_of(sent[node].content), protocol.payload_of(reply.content)
            honest[site] = {k: update[k].astype(np.float64) - base[k] for k in base}
            if site in attacks:
                attacks[site](reply, update, base)
        return replies

    grid.send_and_receive = send
    return honest


def _set_arrays(reply: Message, arrays: dict[str, np.ndarray]) -> None:
    protocol.put_payload(reply.content, {k: np.asarray(v, np.float32) for k, v in arrays.items()})


def test_scaled_flipped_and_inflated_replies_cannot_steer_the_global_model(root: Path) -> None:
    fed, grid = _federation(root, **{"federation.task_rounds": 0})
    start = {}

    def inflate(reply, update, base):  # honest arrays, a claim of 1e12 examples
        start.update(base)
        next(iter(reply.content.metric_records.values()))["num-examples"] = 1e12

    honest = _attack(grid, {
        "site_a": inflate,
        "site_b": lambda r, u, g: _set_arrays(r, {k: g[k] - 10 * (u[k] - g[k]) for k in g}),
        "site_c": lambda r, u, g: _set_arrays(r, {k: u[k] * 1e20 for k in u}),
    })
    (record,) = fed.run().records
    assert [r["site"] for r in record["rejected"]] == ["site_c"]
    assert "reject_update_norm" in record["rejected"][0]["reason"]
    assert [c["site"] for c in record["clipped"]] == ["site_b"] and record["clipped"][0]["ratio"] > 3
    cap = fed.site_sizes["site_a"]["n_unlabeled"]
    assert record["weights"]["site_a"] == cap < 1e3
    final = ckpt.load_latest(root / "outputs" / "federated" / "checkpoints").arrays
    assert max(float(np.abs(v).max()) for v in final.values()) < 100
    # the global model moved at most the bound: 3 x the lower median change (here site_a's honest one)
    bound = 3 * robust.norm(honest["site_a"]) * (1 + 1e-4)
    assert robust.change_norm(final, start) <= bound


def test_exploded_aggregate_is_never_checkpointed(root: Path) -> None:
    fed, grid = _federation(root, **{"federation.task_rounds": 1, "federation.robust.max_update_norm": "null",
                                     "federation.robust.reject_update_norm": "null"})
    rounds = {"n": 0}

    def scale_once(reply, update, base):
        rounds["n"] += 1
        if rounds["n"] == 1:
            _set_arrays(reply, {k: v * 1e20 for k, v in update.items()})

    _attack(grid, {"site_c": scale_once})
    first, second = fed.run().records
    assert "max_global_change" in first["aggregate_rejected"] and "aggregate_rejected" not in second
    folder = root / "outputs" / "federated" / "checkpoints"
    assert not ckpt.checkpoint_path(folder, 1).exists()
    last = ckpt.load_latest(folder)
    assert last.round == 2 and max(float(np.abs(v).max()) for v in last.arrays.values()) < 100
    saved = json.loads((root / "outputs" / "federated" / "history.json").read_text())
    assert saved[0]["aggregate_rejected"] == first["aggregate_rejected"]


def test_silent_sites_are_named_and_a_run_that_cannot_train_ends(root: Path) -> None:
    fed, grid = _federation(root, **{"federation.task_rounds": 2})
    original = grid.send_and_receive

    def send(messages, timeout=None):
        messages = list(messages)
        if messages[0].metadata.message_type == MessageType.QUERY:  # the handshake reaches every site
            return original(messages, timeout=timeout)
        spent = [m for m in messages if m.metadata.message_type == MessageType.TRAIN
                 and int(m.content["config"][protocol.ROUND]) >= 2 and grid.nodes[m.metadata.dst_node_id] != "site_c"]
        errors = [Message(Error(code=protocol.ERROR_BUDGET_SPENT, reason="privacy budget spent"), reply_to=m)
                  for m in spent]
        rest = [m for m in messages
                if all(m is not s for s in spent) and grid.nodes[m.metadata.dst_node_id] != "site_c"]
        return original(rest, timeout=timeout) + errors  # site_c never answers after the handshake

    grid.send_and_receive = send
    first, second = fed.run().records
    silent = {"node": "3", "site": "site_c", "reason": "no reply within 60 s"}
    assert first["failed"] == [silent] and first["eval_failed"] == [silent]
    assert set(first["site_train"]) == {"site_a", "site_b"}
    assert {f["site"] for f in second["failed"]} == set(fed.identity.values())
    assert "min_train_replies=2" in second["stopped"] and "site_a, site_b" in second["stopped"]
    final = json.loads((root / "outputs" / "federated" / "final_metrics.json").read_text())
    assert final["stopped"] == second["stopped"] and [f["site"] for f in final["failed"]] == ["site_c"]
