"""One site that lies to the coordinator - in its metrics, its handshake, its aggregation weight or the text
of its reasons - is refused by name and never stops the run or erases the other sites' records: the real
ServerApp round loop against the real ClientApp handlers (in-process LocalGrid), one site's replies edited."""
from __future__ import annotations

import json
import math
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


@pytest.mark.parametrize("records", ["array_records", "metric_records"])
def test_a_site_naming_its_records_its_own_way_does_not_stall_the_federation(root: Path, records: str) -> None:
    """The audit's a_rename_record: screening took "the one record" whatever its name, and Flower's strategy
    then refused every round whose replies named them differently: no aggregate, no checkpoint, and the site
    unnamed. The strategy now gets the protocol's names."""
    fed, grid = _federation(root, **{"federation.task_rounds": 1})

    def rename(reply: Message) -> None:
        (name,) = list(getattr(reply.content, records))
        reply.content[name + "_v2"] = getattr(reply.content, records)[name]
        del reply.content[name]

    _lying(grid, "train", rename)
    records_ = fed.run().records
    assert all("aggregate_rejected" not in r and set(r["site_train"]) == {"site_a", "site_b", "site_c"} for r in records_)
    assert ckpt.load_latest(root / "outputs" / "federated" / "checkpoints").round == 2


def test_an_infinite_metric_is_rejected_and_a_nan_leaves_the_others_aggregate(root: Path) -> None:
    """The audit's e_metric_inf: an infinity passed screening ([0, inf] is a closed range, and a bias or loss has
    none) and Flower's weighted mean made the aggregate inf or NaN for everyone, null in history.json. An
    infinity is refused by name; NaN stays valid (an AUC over one class) and the aggregate skips it."""
    fed, grid = _federation(root, **{"federation.task_rounds": 0, "federation.final_eval_split": "null"})
    _lying(grid, "evaluate", lambda reply: _metrics(reply).__setitem__("mae_bmd", float("inf")))
    (record,) = fed.run().records
    assert [r["site"] for r in record["eval_failed"]] == ["site_c"]
    assert "metric 'mae_bmd' is not a finite number (inf)" in record["eval_failed"][0]["reason"]
    fed, grid = _federation(root, **{"federation.task_rounds": 0, "federation.final_eval_split": "null",
                                     "federation.run_name": "nan"})
    _lying(grid, "evaluate", lambda reply: _metrics(reply).__setitem__("bias_bmd", float("nan")))
    (record,) = fed.run().records
    honest = [record["site_eval"][s]["bias_bmd"] for s in ("site_a", "site_b")]
    assert record["eval_failed"] == [] and math.isnan(record["site_eval"]["site_c"]["bias_bmd"])
    assert min(honest) <= record["evaluate"]["bias_bmd"] <= max(honest)  # the two sites' mean, not NaN


@pytest.mark.parametrize("edit, reason", [
    (lambda m: m.__setitem__("x\n\x1b[2Kforged", 0.5), "a metric's name is not a plain name"),
    (lambda m: m.__setitem__("a,b<script>", 0.5), "a metric's name is not a plain name"),
    (lambda m: [m.__setitem__(f"m{i:04d}", 0.5) for i in range(250)], "more than the 200 a reply may carry"),
], ids=["log-line", "csv-markup", "flood"])
def test_a_metric_name_that_is_not_a_plain_name_or_a_flood_of_them_is_rejected(root: Path, edit, reason: str) -> None:
    """The audit's f_metric_names and h_log_injection: metric names reached the coordinator's log raw (a forged
    log line), split history.csv's header, and 2,000 keys of 1,000 characters grew each checkpoint by 16 MB."""
    fed, grid = _federation(root, **{"federation.task_rounds": 0, "federation.final_eval_split": "null"})
    _lying(grid, "evaluate", lambda reply: edit(_metrics(reply)))
    (record,) = fed.run().records
    assert [r["site"] for r in record["eval_failed"]] == ["site_c"] and reason in record["eval_failed"][0]["reason"]
    assert "\x1b" not in record["eval_failed"][0]["reason"] and "\n" not in record["eval_failed"][0]["reason"]
    assert set(record["evaluate"]) and all(k.isidentifier() or "-" in k for k in record["evaluate"])


def test_a_handshake_that_says_it_withholds_is_refused_not_admitted_unchecked(root: Path) -> None:
    """The audit's b_withheld_handshake: a handshake with a wrong feature set and payload fingerprint and a
    'withheld' field was filed as withheld, so never checked, and the site trained every round."""
    fed, grid = _federation(root)

    def withholding(reply: Message) -> None:
        reply.content[SITE]["features_sha256"] = reply.content[SITE]["payload_sha256"] = "0" * 64
        reply.content[SITE][WITHHELD] = "small cohort"

    _lying(grid, "handshake", withholding)
    fed.handshake()
    assert list(fed.refused_at_handshake) == ["site_c"] and "a handshake withholds nothing" in fed.refused_at_handshake["site_c"]
    assert fed.identities.admitted() == {1, 2}
