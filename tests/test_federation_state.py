"""Site state store, server checkpoints, reply screening and strategy choice (no training)."""
from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedTrimmedAvg
from flwr.supercore.task_identity import TaskIdentity

from osteo_model.config import compose
from osteo_model.errors import ConfigError, StateError
from osteofl import protocol
from osteofl.client.state_store import SiteState, StateStore
from osteofl.server import checkpoint as ckpt
from osteofl.server.identity import Identities
from osteofl.server.screening import for_strategy, screen
from osteofl.server.strategies import build_strategy, restore_strategy_state, strategy_state


def test_state_store_round_trip_revisions_and_backup(tmp_path: Path) -> None:
    store = StateStore(tmp_path, "site_a")
    assert store.load().revision == 0 and not store.load().local  # never trained: fresh
    state = SiteState("site_a", local={"local_expert.w": torch.ones(2)}, epsilon=1.5, rounds_trained=1,
                      accountant={"mechanism": "rdp", "history": [[1.0, 0.1, 5]]})
    store.save(state)
    state.local["local_expert.w"] = torch.full((2,), 3.0)
    store.save(state)
    loaded = store.load()
    assert loaded.revision == 2 and loaded.epsilon == 1.5 and loaded.accountant["history"] == [[1.0, 0.1, 5]]
    assert torch.equal(loaded.local["local_expert.w"], torch.full((2,), 3.0))
    previous = torch.load(tmp_path / "site_state.prev.pt", weights_only=True)
    assert previous["revision"] == 1 and torch.equal(previous["local"]["local_expert.w"], torch.ones(2))
    assert not list(tmp_path.glob(".*tmp*"))
    # a save that trained nothing (a run's name, an evaluation counted) leaves the backup of the last good parts
    state.evaluations_by_run["R"] = 1
    store.save(state, keep_previous=False)
    assert store.load().evaluations_by_run == {"R": 1} and store.load().revision == 3
    assert torch.load(tmp_path / "site_state.prev.pt", weights_only=True)["revision"] == 1


def test_state_files_are_the_sites_owners_alone_and_keep_its_shuffle_salt(tmp_path: Path) -> None:
    """The local parts and the feature standardisation in the state are the site's patients' (the
    standardisation holds their exact feature moments): owner-only, as its split pin and audit log. The
    salt that keeps its batch order secret survives the save; a state saved before it had none."""
    store = StateStore(tmp_path, "site_a")
    store.save(SiteState("site_a", local={"w": torch.ones(1)}, shuffle_salt="ab" * 16))
    store.save(store.load())
    for name in ("site_state.pt", "site_state.prev.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    assert store.load().shuffle_salt == "ab" * 16
    raw = torch.load(tmp_path / "site_state.pt", weights_only=True)
    torch.save({k: v for k, v in raw.items() if k != "shuffle_salt"}, tmp_path / "site_state.pt")
    assert store.load().shuffle_salt is None


@pytest.mark.parametrize("damage", ["truncate", "other_site", "version", "missing_with_backup"])
def test_damaged_state_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    store = StateStore(tmp_path, "site_a")
    store.save(SiteState("site_a", local={"w": torch.ones(1)}))
    store.save(SiteState("site_a", local={"w": torch.ones(1)}, revision=1))
    path = tmp_path / "site_state.pt"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "other_site":
        store = StateStore(tmp_path, "site_b")
    elif damage == "version":
        raw = torch.load(path, weights_only=True)
        torch.save({**raw, "format_version": 99}, path)
    else:
        path.unlink()
    with pytest.raises(StateError) as err:
        store.load()
    assert str(path) in str(err.value)


def test_checkpoints_are_atomic_pruned_and_damage_is_an_error(tmp_path: Path) -> None:
    arrays = {"encoder.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    for rnd in range(1, 5):
        ckpt.save_checkpoint(tmp_path, ckpt.Checkpoint(rnd, "task", arrays, {"m_t/encoder.w": arrays["encoder.w"]},
                                                       {"strategy": "fedadam", "history": [{"auc": float("nan")}]}),
                             keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["round-0003.npz", "round-0004.npz"]
    last = ckpt.load_latest(tmp_path)
    assert last.round == 4 and last.phase == "task" and last.meta["strategy"] == "fedadam"
    np.testing.assert_array_equal(last.arrays["encoder.w"], arrays["encoder.w"])
    assert set(last.strategy_state) == {"m_t/encoder.w"}
    ckpt.checkpoint_path(tmp_path, 4).write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(StateError, match="round-0004.npz"):
        ckpt.load_latest(tmp_path)
    assert ckpt.load_latest(tmp_path / "none") is None


@pytest.mark.parametrize("name,cls", [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam),
                                      ("fedtrimmedavg", FedTrimmedAvg)])
def test_strategy_is_flowers_own_with_config_minimum(name: str, cls: type, tmp_path: Path) -> None:
    cfg = compose([f"paths.root={tmp_path}", f"federation.strategy={name}", "federation.min_available_nodes=3"])
    strategy = build_strategy(cfg)
    assert type(strategy) is cls and strategy.min_available_nodes == 3 and strategy.min_train_nodes == 3
    if name == "fedprox":
        assert strategy.proximal_mu == cfg.federation.strategy_args.fedprox.proximal_mu


def test_unknown_strategy_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fedsomething"):
        build_strategy(compose([f"paths.root={tmp_path}", "federation.strategy=fedsomething"]))


def test_strategy_state_round_trip() -> None:
    a, b = FedAdam(), FedAdam()
    a.m_t, a.v_t = {"w": np.ones(2)}, {"w": np.full(2, 2.0)}
    restore_strategy_state(b, strategy_state(a))
    np.testing.assert_array_equal(b.v_t["w"], [2.0, 2.0])
    assert strategy_state(FedAvg()) == {}


def _reply(node: int, arrays: dict, metrics: dict, site: str = "s") -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site})})
    if arrays is not None:
        protocol.put_payload(content, arrays)
    return Message(content, reply_to=msg)


def test_screen_rejects_bad_updates_and_aligns_metric_keys() -> None:
    good = {"w": np.ones((2, 2), np.float32)}
    expected = {"w": ((2, 2), "float32")}
    replies = [
        _reply(1, good, {"num-examples": 10, "loss": 1.0, "extra": 2.0}, "a"),
        _reply(2, good, {"num-examples": 5, "loss": 2.0}, "b"),
        _reply(3, {"w": np.full((2, 2), np.inf, np.float32)}, {"num-examples": 5}, "c"),
        _reply(4, {"w": np.ones((3, 2), np.float32)}, {"num-examples": 5}, "d"),
        _reply(5, {**good, "local_expert.0.weight": np.ones(1, np.float32)}, {"num-examples": 5}, "e"),
        _reply(6, good, {"loss": 1.0}, "f"),
        _reply(7, good, {"num-examples": 0}, "g"),
        _reply(8, None, {"num-examples": 3}, "h"),
    ]
    out = screen(replies, expected, Identities(None, "declared", "unused"))
    assert [m.metadata.src_node_id for m in out.accepted] == [1, 2]
    assert set(out.updates) == {1, 2} and all(np.array_equal(u["w"], good["w"]) for u in out.updates.values())
    reasons = {r["site"]: r["reason"] for r in out.rejected}
    assert set(reasons) == {"c", "d", "e", "f", "g", "h"}
    assert "non-finite" in reasons["c"] and "shape" in reasons["d"] and "unexpected" in reasons["e"]
    assert "extra" in next(iter(out.accepted[0].content.metric_records.values()))  # the site's reply is kept as sent
    weights = {1: 10.0, 2: 5.0}
    copies = for_strategy(out.accepted, weights, out.updates)  # the strategy gets the keys all replies share
    assert all(set(next(iter(m.content.metric_records.values()))) == {"num-examples", "loss"} for m in copies)
    arrays, metrics = FedAvg().aggregate_train(1, copies)  # Flower accepts what survives screening
    np.testing.assert_allclose(protocol.unpack(arrays, expected, cast=True)["w"], np.ones((2, 2)))
    assert metrics["loss"] == pytest.approx((10 * 1.0 + 5 * 2.0) / 15)
