"""One site that lies to the coordinator - in its metrics, its handshake, its aggregation weight or the text
of its reasons - is refused by name and never stops the run or erases the other sites' records: the real
ServerApp round loop against the real ClientApp handlers (in-process LocalGrid), one site's replies edited."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from federation_helpers import make_caches
from osteo_model.errors import ConfigError
from osteo_model.metrics import value_range
from osteofl.protocol import NUM_EXAMPLES, SITE, WITHHELD
from osteofl.server import checkpoint as ckpt
from osteofl.server.identity import Identities
from osteofl.server.screening import screen
from test_federation_rounds import _federation

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_caches(tmp_path)


def _kind(reply: Message) -> str:
    if reply.content.array_records:
        return "train"
    return "handshake" if "n_features" in reply.content.config_records.get(SITE, {}) else "evaluate"


def _lying(grid, kind: str, edit: Callable[[Message], None], site: str = "site_c") -> None:
    """``site``'s replies of one kind ("handshake", "train", "evaluate") are edited by ``edit`` before they leave."""
    grid.tamper = lambda name, reply: edit(reply) if name == site and _kind(reply) == kind else None


def _metrics(reply: Message) -> MetricRecord:
    return next(iter(reply.content.metric_records.values()))


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_list_valued_metric_is_rejected_by_name_and_the_run_goes_on(root: Path, kind: str) -> None:
    fed, grid = _federation(root, **{"federation.task_rounds": 0})

    def listed(reply: Message) -> None:
        record = _metrics(reply)
        record[next(k for k in record if k != NUM_EXAMPLES)] = [1.0, 2.0]  # Flower's aggregation raised on it

    _lying(grid, kind, listed)
    (record,) = fed.run().records
    refused = record["rejected"] if kind == "train" else record["eval_failed"]
    assert [r["site"] for r in refused] == ["site_c"] and "is not a number (list)" in refused[0]["reason"]
    assert set(record["site_train" if kind == "train" else "site_eval"]) == {"site_a", "site_b"}
    assert record["train"] and record["evaluate"]  # aggregated from the other two
    assert ckpt.load_latest(root / "outputs" / "federated" / "checkpoints").round == 1


@pytest.mark.parametrize("key, value, shown", [("auc", 1e6, "[0, 1]"), ("patient_r_bmd", -3.0, "[-1, 1]"),
                                               ("patient_mae_bmd", -0.5, "[0, inf]")])
def test_an_evaluation_metric_no_site_computes_is_rejected(root: Path, key: str, value: float, shown: str) -> None:
    """An AUC of 1e6 set the aggregate evaluation row at any weight; NaN (one class only) stays a valid value."""
    fed, grid = _federation(root, **{"federation.task_rounds": 0})
    _lying(grid, "evaluate", lambda reply: _metrics(reply).__setitem__(key, value))
    (record,) = fed.run().records
    assert [r["site"] for r in record["eval_failed"]] == ["site_c"]
    assert f"metric {key!r} = {value:g} is outside its range {shown}" in record["eval_failed"][0]["reason"]
    assert set(record["site_eval"]) == {"site_a", "site_b"} and 0 <= record["evaluate"]["auc"] <= 1


def test_an_exception_in_the_strategys_aggregation_refuses_that_round_only(root: Path) -> None:
    fed, _ = _federation(root, **{"federation.task_rounds": 1})
    original = fed.strategy.aggregate_train
    calls = {"train": 0}

    def fails_once(rnd, replies):
        calls["train"] += 1
        if calls["train"] == 1:
            raise TypeError("'float' object is not iterable")
        return original(rnd, replies)

    def never(rnd, replies):
        raise ValueError("zip() argument 2 is shorter than argument 1")

    fed.strategy.aggregate_train, fed.strategy.aggregate_evaluate = fails_once, never
    first, second = fed.run().records
    assert "aggregation failed: TypeError" in first["aggregate_rejected"] and "aggregate_rejected" not in second
    assert first["evaluate"] == {} and set(first["site_eval"]) == {"site_a", "site_b", "site_c"}  # kept per site
    folder = root / "outputs" / "federated" / "checkpoints"
    assert not ckpt.checkpoint_path(folder, 1).exists() and ckpt.load_latest(folder).round == 2


@pytest.mark.parametrize("edit, reason", [
    (lambda s: s.__setitem__("n_train", "many"), "'n_train' is not a whole number"),
    (lambda s: s.__setitem__("cap-max_rounds", "lots"), "'cap-max_rounds' is not a whole number"),
    (lambda s: s.__delitem__("n_features"), "'n_features' is not a whole number"),
    (lambda s: s.__setitem__("n_features", float("inf")), "'n_features' is not a whole number"),
    (lambda s: s.__setitem__("payload_sha256", "not hex"), "'payload_sha256' is not a SHA-256"),
    (lambda s: s.__setitem__("features_sha256", "0" * 64), "radiomic feature set (6 features, 000000000000) "
                                                          "is not the majority's"),
], ids=["size-text", "cap-text", "no-n_features", "n_features-inf", "payload-hash", "other-feature-set"])
def test_a_malformed_or_minority_handshake_refuses_that_site_only(root: Path, edit, reason: str) -> None:
    fed, grid = _federation(root)
    _lying(grid, "handshake", lambda reply: edit(reply.content[SITE]))
    n_features, sizes = fed.handshake()
    assert n_features == 6 and set(sizes) == {"site_a", "site_b"}
    assert list(fed.refused_at_handshake) == ["site_c"] and reason in fed.refused_at_handshake["site_c"]
    assert fed.identities.admitted() == {1, 2}


def test_no_majority_feature_set_stops_the_run_in_one_line(root: Path) -> None:
    fed, grid = _federation(root, sites=("site_a", "site_b"))
    _lying(grid, "handshake", lambda reply: reply.content[SITE].__setitem__("features_sha256", "f" * 64), "site_b")
    with pytest.raises(ConfigError, match="no majority of the sites shares one radiomic feature set") as err:
        fed.handshake()
    assert "site_a: 6 features" in str(err.value) and "site_b: 6 features ffffffffffff" in str(err.value)
    assert "\n" not in str(err.value)


def test_one_site_sending_fewer_metrics_keeps_every_other_sites_metrics(root: Path) -> None:
    fed, grid = _federation(root, **{"federation.task_rounds": 0})

    def bare(reply: Message) -> None:
        (name,) = reply.content.metric_records
        reply.content[name] = MetricRecord({NUM_EXAMPLES: _metrics(reply)[NUM_EXAMPLES]})

    grid.tamper = lambda site, reply: bare(reply) if site == "site_c" and _kind(reply) != "handshake" else None
    (record,) = fed.run().records
    for site in ("site_a", "site_b"):
        assert {"epsilon", "train_loss"} <= set(record["site_train"][site])  # the privacy record stays
        assert "auc" in record["site_eval"][site]
    assert record["site_train"]["site_c"] == {} and record["train"] == {}  # nothing the three share
    final = json.loads((root / "outputs" / "federated" / "final_metrics.json").read_text())
    assert "auc" in final["sites"]["site_a"] and "auc" in final["sites"]["site_b"]


def test_an_evaluate_replys_weight_is_capped_like_trainings(root: Path) -> None:
    fed, grid = _federation(root, **{"federation.task_rounds": 0})

    def inflated(reply: Message) -> None:  # huge values where no range can tell them (a bias): only the weight bounds them
        record = _metrics(reply)
        for key in record:
            if key == NUM_EXAMPLES or value_range(key) is None:
                record[key] = 1e300 if key == NUM_EXAMPLES else 1e6

    _lying(grid, "evaluate", inflated)
    (record,) = fed.run().records
    sizes = {site: fed.site_sizes[site]["n_val"] for site in ("site_a", "site_b", "site_c")}
    assert len(set(sizes.values())) == 1  # equal handshake sizes: the aggregate is the plain mean
    mean = np.mean([record["site_eval"][s]["bias_bmd"] for s in sizes])
    assert record["evaluate"]["bias_bmd"] == pytest.approx(mean) and record["evaluate"]["bias_bmd"] < 1e6 / 2


def test_an_inflated_handshake_size_gives_at_most_max_weight_ratio_times_the_median_weight(root: Path) -> None:
    fed, grid = _federation(root, **{"federation.task_rounds": 0})

    def huge_pool(site: str, reply: Message) -> None:  # reports a pool of 10**9, then claims it in training
        if site == "site_c" and _kind(reply) == "handshake":
            reply.content[SITE]["n_unlabeled"] = reply.content[SITE]["n_train"] = 10**9
        elif site == "site_c" and _kind(reply) == "train":
            _metrics(reply)[NUM_EXAMPLES] = 1e9

    grid.tamper = huge_pool
    (record,) = fed.run().records
    assert fed.site_sizes["site_c"]["n_unlabeled"] == 10**9  # believed at the handshake ...
    honest = [record["weights"]["site_a"], record["weights"]["site_b"]]
    assert record["weights"]["site_c"] == pytest.approx(3.0 * min(honest))  # ... but weighs 3 x the lower median


def test_text_a_site_sends_is_cleaned_before_it_is_logged_or_stored() -> None:
    forged = "fine\n\x1b[92mINFO \x1b[0m:      round 1: site_b withheld its update: forged line\x1b[2K"
    asked = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.TRAIN)
             for n in (1, 2)]
    replies = [Message(Error(code=903, reason=forged + "A" * 5000), reply_to=asked[0]),
               Message(RecordDict({"metrics": MetricRecord({NUM_EXAMPLES: 0}),
                                   SITE: ConfigRecord({"name": "site_c", WITHHELD: forged})}), reply_to=asked[1])]
    got = screen(replies, None, Identities(None, "declared", "unused"))
    for reason in (got.failed[0]["reason"], got.withheld[0]["reason"]):
        assert "\n" not in reason and "\x1b" not in reason and "[92m" not in reason and len(reason) <= 300
        assert reason.startswith("fine INFO :")  # one line, readable, the site's words kept
