"""The hospital's own policy against a coordinator that asks for more than it may (client/policy.py,
client/audit.py), tested on the real ClientApp/ServerApp in-process (LocalGrid): share_all refused,
the site's DP floor and budget, the minimum cohort, no feature statistics in the handshake (the
differencing attack), no local path in any reply, and an audit log that lists exactly what was sent."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from cache_factory import copy_cache, make_site_cache
from federation_helpers import SITES, LocalGrid, make_caches, small_overrides
from osteo_model import central, dataset, model as osteo, training
from osteo_model.cache import SiteCache
from osteo_model.config import compose, compose_site
from osteo_model.errors import ConfigError, OsteoError, StateError
from osteofl import protocol
from osteofl.client import audit, audit_cli, policy
from osteofl.client.client_app import make_client_app
from osteofl.server.server_app import Federation

pytestmark = pytest.mark.usefixtures("task_identity")


def _federation(root: Path, sites=tuple(SITES), run: str = "", node: dict | None = None, **extra):
    """``run``: the coordinator's overrides (run config); ``node``: each site's own `osteo-client` overrides."""
    overrides = small_overrides(root, **extra)
    grid = LocalGrid(make_client_app(overrides), sites, run_config={"overrides": run} if run else None,
                     node_overrides=node)
    return Federation(grid, compose([*overrides, *run.split()])), grid


def _ask(app, kind: str, config: dict, node: dict, run: str = "", arrays: dict | None = None, flower_run: int = 1) -> Message:
    """One message of a coordinator straight to a site's ClientApp: ``config`` its instructions, ``node`` the
    site's node config, ``run`` the run's overrides, ``arrays`` the global model, ``flower_run`` Flower's run id."""
    content = RecordDict({protocol.CONFIG: ConfigRecord(config)})
    if arrays is not None:
        protocol.put_payload(content, arrays)
    types = {"query": MessageType.QUERY, "train": MessageType.TRAIN, "evaluate": MessageType.EVALUATE}
    return app(Message(content, dst_node_id=1, message_type=types[kind]),
               Context(run_id=flower_run, node_id=1, node_config=node, state=RecordDict(),
                       run_config={"overrides": run} if run else {}))


def _handshake(app, site: str, overrides: list[str] | None = None) -> Message:
    return _ask(app, "query", {protocol.PHASE: "handshake"}, {"site": site, **({"overrides": " ".join(overrides)} if overrides else {})})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_caches(tmp_path)


# --- units ----------------------------------------------------------------------------------------------------
def test_sanitise_strips_paths_and_identifiers() -> None:
    text = ("InputError: /srv/hospital/data/cache/site_a/index.csv: row of patient P-0007 (study_id=S123) "
            "unreadable; see C:\\pacs\\exports\\x.dcm and data/sites/site_a/studies.csv")
    out = policy.sanitise(text, identifiers={"P-0007", "S123", "site_a-p004"})
    for leak in ("/srv", "hospital", "P-0007", "S123", "pacs", "x.dcm", "studies.csv", "data/sites"):
        assert leak not in out, out
    assert out.startswith("InputError: <path>") and "unreadable" in out
    assert policy.sanitise("known id site_a-p004 failed", {"site_a-p004"}) == "known id <id> failed"
    assert len(policy.sanitise("x" * 5000)) <= policy.REASON_MAX_CHARS


def test_privacy_floor_takes_the_stricter_side_and_cohort_has_a_hard_floor(tmp_path: Path) -> None:
    run = compose([f"paths.root={tmp_path}", "privacy=dp", "privacy.noise_multiplier=2.0", "privacy.epsilon_budget=5"])
    site = compose([f"paths.root={tmp_path}", "privacy=dp", "privacy.noise_multiplier=1.0", "privacy.epsilon_budget=1",
                    "privacy.max_grad_norm=0.5"])
    p = policy.effective_config(run, site).privacy
    assert (p.enabled, p.noise_multiplier, p.epsilon_budget, p.max_grad_norm) == (True, 2.0, 1.0, 0.5)
    none = compose([f"paths.root={tmp_path}"])
    assert policy.effective_config(none, site).privacy.epsilon_budget == 1.0  # coordinator asks for no DP
    assert policy.effective_config(run, none).privacy.noise_multiplier == 2.0  # a stricter request is honoured
    loose = compose([f"paths.root={tmp_path}", "site.policy.allow_share_all=true", "site.policy.min_cohort=5"])
    eff = policy.effective_config(loose, none)  # the run cannot loosen the site's policy
    assert not eff.site.policy.allow_share_all and eff.site.policy.min_cohort == 10
    with pytest.raises(ConfigError, match="hard floor"):
        policy.effective_config(none, compose([f"paths.root={tmp_path}", "site.policy.min_cohort=2"]))


def test_site_yaml_sets_a_dp_floor_the_run_cannot_lower(tmp_path: Path) -> None:
    site_dir = tmp_path / "data" / "sites" / "site_a"
    site_dir.mkdir(parents=True)
    floor = "{enabled: true, noise_multiplier: 1.5, max_grad_norm: 1.0, delta: 1.0e-5, epsilon_budget: 0.5}"
    (site_dir / "site.yaml").write_text(f"policy:\n  privacy: {floor}\n")
    own = compose_site([f"paths.root={tmp_path}", "site.name=site_a"])
    p = policy.effective_config(compose([f"paths.root={tmp_path}"]), own).privacy
    assert (p.enabled, p.noise_multiplier, p.epsilon_budget) == (True, 1.5, 0.5)
    (site_dir / "site.yaml").write_text("policy:\n  privacy: {enabled: true, epsilon_budget: 0.5}\n")
    with pytest.raises(ConfigError, match="noise_multiplier"):
        policy.effective_config(compose([f"paths.root={tmp_path}"]), compose_site([f"paths.root={tmp_path}", "site.name=site_a"]))
    # `enable` for `enabled`: the floor would be off without a word
    (site_dir / "site.yaml").write_text(f"policy:\n  privacy: {floor.replace('enabled', 'enable')}\n")
    with pytest.raises(ConfigError, match="site.policy.privacy.enable is not a DP setting"):
        policy.effective_config(compose([f"paths.root={tmp_path}"]), compose_site([f"paths.root={tmp_path}", "site.name=site_a"]))
    for bad, problem in (("noise_multiplier: 1.5", "noise_multiplier: high"), ("delta: 1.0e-5", "delta: 1.5"),
                         ("epsilon_budget: 0.5", "epsilon_budget: 0")):
        (site_dir / "site.yaml").write_text(f"policy:\n  privacy: {floor.replace(bad, problem)}\n")
        key, value = problem.split(": ")
        with pytest.raises(ConfigError, match=f"site.policy.privacy.{key}='?{value}'?" + r" must be a number > 0"):
            policy.effective_config(compose([f"paths.root={tmp_path}"]),
                                    compose_site([f"paths.root={tmp_path}", "site.name=site_a"]))


def test_central_and_site_standardise_on_the_same_unlabeled_rows(root: Path) -> None:
    cfg = compose(small_overrides(root, **{"train.ssl_epochs": 0, "train.task_epochs": 0}))
    datas = central.load_sites(cfg, SITES)
    models, _ = central.train_central(cfg, datas, root / "central", log=lambda _: None)
    for site, data in datas.items():
        rows = data.splits["unlabeled"]
        held_out = np.concatenate([data.splits["val"], data.splits["test"]])
        assert len(rows) and not set(rows) & set(held_out)
        mean, std = osteo.feature_stats(np.asarray(data.cache.features)[rows])
        assert np.allclose(models[site].feature_norm.mean.numpy(), mean)
        assert np.allclose(models[site].feature_norm.std.numpy(), std)
        everything = osteo.feature_stats(np.asarray(data.cache.features))[0]
        assert not np.allclose(everything, mean)  # val/test rows would have changed it


def test_payload_check_refuses_any_key_outside_the_shared_set(tmp_path: Path) -> None:
    cfg = compose([f"paths.root={tmp_path}"])
    model = osteo.build_model(cfg, 6, "hologic")
    policy.check_payload(model, cfg, osteo.shared_keys(model))
    for extra in ("calibration.residual.weight", "feature_norm.mean", "anything.else"):
        with pytest.raises(policy.PolicyRefusal, match="outside the shared set"):
            policy.check_payload(model, cfg, [*osteo.shared_keys(model), extra])


def test_osteo_client_overrides_reach_the_clientapp_as_node_config(tmp_path: Path) -> None:
    """`osteo-client --site X privacy=dp ...`: the hospital's overrides travel in the SuperNode's node config
    (where site_session composes the site's own policy from), intact after Flower's parsing."""
    import argparse

    from flwr.common.config import parse_config_args

    from osteofl.client import cli

    own = ["privacy=dp", "privacy.epsilon_budget=0.001", "model.channels=[4,8]", f"paths.root={tmp_path}"]
    args = argparse.Namespace(site="site_a", superlink=None, local_port=9094, insecure=True, auth_key=None,
                              root_certificates=None)
    cmd = cli.supernode_command(args, compose([*own, "site.name=site_a"]), own)
    node = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert node["site"] == "site_a" and node["overrides"].split() == [*own[:2], "'model.channels=[4,8]'", own[3]]
    with pytest.raises(OsteoError, match="double quote"):
        cli.supernode_command(args, compose([f"paths.root={tmp_path}"]), ['site.label_preset="x"'])


# --- against the real apps -------------------------------------------------------------------------------------
def test_share_all_is_refused_by_the_site_unless_it_opted_in(root: Path) -> None:
    # the coordinator asks for the whole model and even tries to grant itself the opt-in
    fed, grid = _federation(root, run="federation.share_all=true site.policy.allow_share_all=true")
    with pytest.raises(ConfigError, match="only 0 sites answered"):
        fed.handshake()
    assert len(grid.sent) == len(SITES)
    for reply in grid.sent:
        assert reply.error.code == protocol.ERROR_POLICY_REFUSED and "share_all" in reply.error.reason
    for site in SITES:
        (entry,) = audit.read(root / "data" / "state" / site)
        assert entry["refused"] and entry["kind"] == "query" and not entry["arrays"]

    opt_in = {s: "site.policy.allow_share_all=true" for s in SITES}
    fed, grid = _federation(root, run="federation.share_all=true", node=opt_in, **{
        "federation.task_rounds": 0, "federation.final_eval_split": "null", "paths.state_root": str(root / "optin")})
    fed.run()
    sent = protocol.payload_of(next(m for m in grid.sent if m.content.array_records).content)
    model = osteo.build_model(fed.cfg, 6, "hologic")
    assert set(sent) == set(model.state_dict()) and set(osteo.local_keys(model)) <= set(sent)
    # not under DP, even opted in: the whole model holds the feature moments of the site's patients
    fed, grid = _federation(root, run="federation.share_all=true privacy=dp", node=opt_in)
    with pytest.raises(ConfigError, match="only 0 sites answered"):
        fed.handshake()
    assert all("whole model under DP" in reply.error.reason for reply in grid.sent)


def test_under_dp_a_site_does_not_refit_on_its_training_patients(root: Path) -> None:
    """The final refit trains the local parts on the training patients without DP, and the run's test
    metrics would judge that model: outside epsilon. Under DP the site keeps the model its DP rounds made."""
    fed, _ = _federation(root, run="privacy=dp privacy.epsilon_budget=1000", **{"train.final_refit_epochs": 2})
    fed.run()
    final = json.loads((root / "outputs" / "federated" / "final_metrics.json").read_text())
    assert final["split"] == "test" and set(final["sites"]) == set(SITES)  # the final evaluation ran
    for site in SITES:
        card = json.loads((root / "data" / "state" / site / "model_card.json").read_text())
        assert card["epsilon_spent"] > 0 and "refit" not in card


def test_site_dp_floor_and_budget_apply_when_the_coordinator_asks_for_none(root: Path) -> None:
    """The site's ε budget is a cap: a site trains a round only if that round keeps it within the budget
    (before, a site with budget 0.001 trained its first round and reported ε of several units)."""
    from osteo_model.privacy import epsilon_after

    site_cfg = compose([*small_overrides(root), "privacy=dp"])
    first_round = {}
    for s in SITES:
        data = dataset.load_site_data(root / "data" / "cache" / s, site_cfg)
        per_pass = training.steps_per_pass(data, site_cfg, "ssl", per_patient=True)
        first_round[s] = epsilon_after(site_cfg.privacy, per_pass, int(site_cfg.federation.local_steps))
    budget = {"site_a": 1.01 * first_round["site_a"], "site_b": 1.01 * first_round["site_b"], "site_c": 0.001}
    own = {s: f"privacy=dp privacy.epsilon_budget={b:.6f}" for s, b in budget.items()}
    fed, grid = _federation(root, node=own, **{"federation.final_eval_split": "null"})
    assert not fed.cfg.privacy.enabled  # the coordinator's config: no DP at all
    first, second = fed.run().records
    for s in ("site_a", "site_b"):  # trained with DP-SGD, spending what the site foresaw, within its budget
        assert first["site_train"][s]["epsilon"] == pytest.approx(first_round[s], rel=1e-6)
        assert first["site_train"][s]["epsilon"] <= budget[s]
    assert [f["site"] for f in first["failed"]] == ["site_c"]
    assert re.fullmatch(r"site site_c: privacy budget nearly spent: this round's 2 DP steps would take epsilon from "
                        r"0\.000 to \d+\.\d{3}, over the budget 0\.001; not training any more", first["failed"][0]["reason"])
    assert not second["site_train"]  # then each stopped at its own budget, before crossing it
    assert {f["site"] for f in second["failed"]} == set(SITES)
    assert all("would take epsilon from" in f["reason"] or "privacy budget spent" in f["reason"] for f in second["failed"])
    assert not any(m.content.array_records for m in grid.sent if m.has_content() and protocol.SITE in m.content
                   and m.content[protocol.SITE]["name"] == "site_c")  # site_c never sent an update


def test_one_patient_on_another_dxa_device_gets_no_figure_of_its_own(root: Path) -> None:
    """Per-device Bland-Altman figures over one patient are that patient's own prediction error. A val
    patient of site_a measured on a GE Lunar (the site's other patients: Hologic) must not get them."""
    from osteo_model.cache import SiteCache, write_site_cache
    from osteo_model.metrics import compute_metrics

    src = root / "data" / "cache" / "site_a"
    cfg = compose(small_overrides(root))
    data = dataset.load_site_data(src, cfg)
    lone = data.cache.table["patient_id"].iloc[data.splits["val"][0]]
    c = SiteCache.open(src)
    table = c.table.copy()
    table.loc[table["patient_id"] == lone, "dxa_manufacturer"] = "ge_lunar"
    moved = root / "moved"
    write_site_cache(moved, table, np.asarray(c.crops), np.asarray(c.masks), np.asarray(c.features), c.feature_names, c.manifest)
    shutil.rmtree(src)
    moved.rename(src)
    data = dataset.load_site_data(src, cfg)
    rows = data.splits["val"]
    unfiltered = compute_metrics(training.predict(osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer),
                                                  data, rows, "cpu", 64), data.cache.table.iloc[rows])
    assert math.isfinite(unfiltered["patient_bias_bmd_ge_lunar"])  # what the site computed: one patient's error
    fed, grid = _federation(root, **{"federation.final_eval_split": "null"})
    sent = []  # metric names at send time (the server trims records in place later)
    grid.tamper = lambda site, reply: sent.append(set(reply.content[protocol.METRICS])) if (
        site == "site_a" and reply.metadata.message_type == MessageType.EVALUATE) else None
    fed.run()
    assert sent and all("patient_bias_bmd" in keys for keys in sent)
    assert not [k for keys in sent for k in keys if "ge_lunar" in k]


def test_small_sites_withhold_metrics_and_sizes_and_audit_lists_what_was_sent(root: Path, capsys) -> None:
    cache = root / "data" / "cache"
    copy_cache(cache / "site_c", cache / "one_vertebra", np.arange(1), site="one_vertebra")
    copy_cache(cache / "site_c", cache / "two_vertebrae", np.arange(2), site="two_vertebrae")
    sites = ("site_a", "site_b", "one_vertebra", "two_vertebrae")
    fed, grid = _federation(root, sites=sites, **{"federation.final_eval_split": "null"})
    as_sent: dict[int, set[str]] = {}  # metric names at send time (the server trims records in place later)
    grid.tamper = lambda _site, reply: as_sent.setdefault(
        id(reply), {f"{n}/{k}" for n, r in reply.content.metric_records.items() for k in r})
    history = fed.run()
    small = {"one_vertebra", "two_vertebrae"}
    assert set(fed.site_sizes) == set(sites)  # admitted at the handshake, without sizes
    assert all(not fed.site_sizes[s] for s in small) and all(fed.site_sizes[s]["n_train"] for s in sites[:2]), fed.site_sizes
    for record in history.records:
        assert {w["site"] for w in record["withheld"]} == small and not record["failed"]
        assert set(record["site_train"]) == {"site_a", "site_b"}
        for site in small:
            assert set(record["site_eval"][site]) == {"withheld"}
    by_site: dict[str, list[Message]] = {s: [] for s in sites}
    for reply in grid.sent:
        by_site[next(iter(reply.content.config_records.values()))["name"]].append(reply)
    for site in small:
        for reply in by_site[site]:
            assert not reply.content.array_records
            (metrics,) = reply.content.metric_records.values()
            assert set(metrics) == {protocol.NUM_EXAMPLES} and metrics[protocol.NUM_EXAMPLES] in (0, 1)
            assert not set(reply.content[protocol.SITE]) & set(protocol.SPLIT_SIZES)
            site_record = reply.content[protocol.SITE]
            assert "fewer than 5 patients" in site_record.get(protocol.WITHHELD, site_record.get(protocol.SIZES_WITHHELD))

    # the audit log lists exactly what was sent, message by message
    for site in sites:
        entries = audit.read(root / "data" / "state" / site)
        assert len(entries) == len(by_site[site])
        for entry, reply in zip(entries, by_site[site]):
            arrays = {f"{protocol.ARRAYS}/{k}": (list(a.shape), str(a.dtype))
                      for k, a in protocol.payload_of(reply.content).items()} if reply.content.array_records else {}
            assert {k: (v["shape"], v["dtype"]) for k, v in entry["arrays"].items()} == arrays
            assert set(entry["metrics"]) == as_sent[id(reply)] and entry["bytes"] > 0
            assert (entry["withheld"] is not None) == (site in small)
    assert audit_cli.main(["--site", "site_a", *small_overrides(root)]) == 0
    out = capsys.readouterr().out
    assert "query 1, train 2" in out and "declared local among them: none" in out
    summary = audit.summarise(audit.read(root / "data" / "state" / "site_a"))["1"]
    shared = set(osteo.shared_keys(osteo.build_model(fed.cfg, 6, "hologic")))
    assert set(summary["array_keys"]) == shared and not summary["local_keys"]


def test_every_count_a_reply_carries_is_rounded_like_the_handshakes(root: Path) -> None:
    """Exact counts in train or evaluate replies would undo the handshake's rounding: a coordinator that
    compares two runs would see one new study. Weights and patient counts leave rounded up."""
    fed, grid = _federation(root)
    fed.run()
    cfg = fed.cfg
    exact = {len(dataset.load_site_data(root / "data" / "cache" / s, cfg).splits[k]) for s in SITES for k in ("train", "val", "test")}
    assert any(n % policy.COUNT_QUANTUM for n in exact)  # the sites' true counts are not all round already
    counts: dict[str, list[float]] = {}
    for reply in grid.sent:
        (metrics,) = reply.content.metric_records.values()
        for key in (protocol.NUM_EXAMPLES, *policy.COUNT_METRICS):
            if key in metrics:
                counts.setdefault(key, []).append(metrics[key])
    assert set(counts) == {protocol.NUM_EXAMPLES, *policy.COUNT_METRICS}
    for key, values in counts.items():  # 1: a handshake weighs nothing
        assert all(c == 1 or c % policy.COUNT_QUANTUM == 0 for c in values), (key, values)


def test_handshake_has_no_feature_statistics_and_one_new_study_changes_nothing(root: Path) -> None:
    """The differencing attack: two handshakes, before and after one new study, must not differ in
    anything from which that patient's radiomic vector could be recovered."""
    overrides = small_overrides(root)
    app = make_client_app(overrides)
    before = _handshake(app, "site_a")
    cache = root / "data" / "cache" / "site_a"
    make_site_cache(cache, site="site_a", n_patients=35, size=12, manufacturer="hologic")  # one more patient
    assert len(SiteCache.open(cache)) == 35 * 4
    after = _handshake(app, "site_a")
    for reply in (before, after):
        assert dict(reply.content[protocol.METRICS]) == {protocol.NUM_EXAMPLES: 1}  # no statistic of any kind
        site = dict(reply.content[protocol.SITE])
        assert set(site) == {"name", "n_features", "features_sha256", "payload_sha256", *protocol.SPLIT_SIZES}
        assert all(site[k] % policy.COUNT_QUANTUM == 0 for k in protocol.SPLIT_SIZES)
    counts = set(protocol.SPLIT_SIZES)
    strip = lambda r: {k: v for k, v in dict(r.content[protocol.SITE]).items() if k not in counts}  # noqa: E731
    assert strip(before) == strip(after)
    assert dict(before.content[protocol.SITE]) == dict(after.content[protocol.SITE])  # here even the rounded counts


def test_no_local_path_in_any_reply_even_from_a_broken_cache(root: Path) -> None:
    (root / "data" / "cache" / "site_b" / "features.npy").write_bytes(b"garbage")
    shutil.rmtree(root / "data" / "cache" / "site_c")
    fed, grid = _federation(root)
    with pytest.raises(ConfigError):
        fed.handshake()  # one site left: fewer than min_available_nodes
    errors = [m for m in grid.sent if m.has_error()]
    assert len(errors) == 2
    for reply in grid.sent:
        text = reply.error.reason if reply.has_error() else str(reply.content)
        assert str(root) not in text and "/data/" not in text and "site_b/" not in text, text
    assert all(m.error.code == protocol.ERROR_SITE_FAILED for m in errors)
    assert any("<path>" in m.error.reason for m in errors)
    state = root / "data" / "state" / "site_b"
    assert [e["error_code"] for e in audit.read(state)] == [protocol.ERROR_SITE_FAILED]
    assert json.dumps(audit.read(state)).count(str(root)) == 0


# --- compute caps ---------------------------------------------------------------------------------------------
CAPS = {"max_local_steps": 2, "max_batch_size": 6, "max_refit_epochs": 1}  # batches no smaller than the cohort (5)


def _caps(caps: dict[str, int]) -> str:
    return " ".join(f"site.policy.compute.{k}={v}" for k, v in caps.items())


def test_compute_caps_cut_the_request_and_the_run_cannot_raise_them(tmp_path: Path) -> None:
    run = compose([f"paths.root={tmp_path}", "federation.local_steps=50", "train.batch_size=32",
                   "train.final_refit_epochs=4", "site.policy.compute.max_local_steps=100"])  # tries to lift the cap
    site = compose([f"paths.root={tmp_path}", *_caps(CAPS).split()])
    eff = policy.effective_config(run, site)
    assert (eff.federation.local_steps, eff.train.batch_size, eff.train.eval_batch_size, eff.train.final_refit_epochs) \
        == (2, 6, 6, 1)
    assert eff.site.policy.compute.max_local_steps == 2
    modest = compose([f"paths.root={tmp_path}", "federation.local_steps=1", "train.batch_size=3"])
    eff = policy.effective_config(modest, site)  # a smaller request stands
    assert (eff.federation.local_steps, eff.train.batch_size, eff.train.final_refit_epochs) == (1, 3, 0)
    one_pass = policy.effective_config(compose([f"paths.root={tmp_path}", "federation.local_steps=null"]), site)
    assert one_pass.federation.local_steps is None  # cut where the pass is known
    assert [policy.local_steps(one_pass, n) for n in (1, 2, 9)] == [None, None, 2]
    assert policy.local_steps(policy.effective_config(one_pass, compose([f"paths.root={tmp_path}"])), 9) is None
    for bad, match in (("max_batch_size=0", ">= 1"), ("max_local_steps=2.5", "whole number"),
                       ("max_refit_epochs=-1", ">= 0"), ("max_parameters=true", "whole number")):
        with pytest.raises(ConfigError, match=match):
            policy.effective_config(run, compose([f"paths.root={tmp_path}", f"site.policy.compute.{bad}"]))
    assert policy.effective_config(run, compose([f"paths.root={tmp_path}", "site.policy.compute.max_refit_epochs=0"])
                                   ).train.final_refit_epochs == 0  # a site may forbid the refit


def test_a_coordinator_asking_for_more_compute_gets_what_the_site_allows(root: Path, monkeypatch, caplog) -> None:
    """site_a caps its steps, batches and refit; the coordinator asks for whole passes of 8-crop batches and a
    3-epoch refit and tries to lift site_a's caps through the run config. site_a trains 2 steps of at most 6
    crops a round, predicts in batches of 6 and refits 1 epoch; site_b, uncapped, does what the run asks. The
    coordinator's log names each cut."""
    from osteo_model import training
    from osteo_model.checkpoints import MODEL_CARD_FILE, SPLIT_PIN, VAL_PATIENTS
    from osteofl.client.state_store import StateStore

    steps: list[tuple[str, int]] = []
    eval_batches: dict[str, set[int]] = {}
    real_step, real_predict = training._step, training.predict

    def counting_step(net, batch, cfg, *args, **kwargs):
        steps.append((str(cfg.site.name), len(batch["x"])))
        return real_step(net, batch, cfg, *args, **kwargs)

    def recording_predict(model, data, rows, device, batch_size=64):
        eval_batches.setdefault(str(data.cache.manifest["site"]), set()).add(batch_size)
        return real_predict(model, data, rows, device, batch_size=batch_size)

    monkeypatch.setattr(training, "_step", counting_step)
    monkeypatch.setattr(training, "predict", recording_predict)
    two = ("site_a", "site_b")
    fed, grid = _federation(root, sites=two, run=_caps({"max_local_steps": 100, "max_batch_size": 64}),
                            node={"site_a": _caps(CAPS)}, **{"federation.sites": "[site_a,site_b]",
                                                            "federation.local_steps": "null", "train.final_refit_epochs": 3})
    with caplog.at_level("WARNING", logger="flwr"):
        history = fed.run()
    assert not any(r["failed"] for r in history.records)
    data = {s: dataset.load_site_data(root / "data" / "cache" / s, fed.cfg) for s in two}
    by_site = {s: [n for name, n in steps if name == s] for s in two}
    # per round: site_a 2 steps (ssl + task: 4); site_b one pass of 8-crop batches per phase, plus its refit
    capped = policy.effective_config(fed.cfg, compose(small_overrides(root, **{"site.policy.compute.max_batch_size": 6})))
    salt = StateStore(root / "data" / "state" / "site_a", "site_a").load().shuffle_salt  # the refit's full batches
    assert len(by_site["site_a"]) == 2 * 2 + training.steps_per_pass(data["site_a"], capped, "task", salt=salt)
    assert max(by_site["site_a"]) == 6 and max(by_site["site_b"]) == 8
    passes = sum(training.steps_per_pass(data["site_b"], fed.cfg, p) for p in ("ssl", "task"))
    assert len(by_site["site_b"]) == passes + 3 * training.steps_per_pass(data["site_b"], fed.cfg, "task")
    assert eval_batches == {"site_a": {6}, "site_b": {64}}
    cards = {s: json.loads((root / "data" / "state" / s / MODEL_CARD_FILE).read_text()) for s in two}
    assert cards["site_a"]["refit"]["epochs"] == 1 and cards["site_b"]["refit"]["epochs"] == 3
    for s in two:  # what osteo-predict checks its intervals against
        pin = json.loads((root / "data" / "state" / s / dataset.SPLIT_FILE).read_text())
        assert cards[s][VAL_PATIENTS] == dataset.patients_sha256(data[s], "val") and cards[s][SPLIT_PIN] == pin["id"]
    (warning,) = [r.getMessage() for r in caplog.records if "policy caps" in r.getMessage()]
    assert warning.startswith("handshake: site site_a's policy caps federation.local_steps at 2 (this run asks one pass)")
    assert "train.batch_size at 6 (this run asks 8)" in warning and "train.final_refit_epochs at 1 (this run asks 3)" in warning
    (query,) = [e for e in audit.read(root / "data" / "state" / "site_a") if e["kind"] == "query"]
    assert query["config"][f"{protocol.SITE}/{protocol.CAP_PREFIX}max_batch_size"] == 6  # the DPO sees what was announced


def test_a_site_refuses_a_network_larger_than_its_policy_allows(root: Path) -> None:
    model = osteo.build_model(compose(small_overrides(root)), 6, "hologic")
    n = sum(p.numel() for p in model.parameters())
    fed, grid = _federation(root, node={"site_a": f"site.policy.compute.max_parameters={n - 1}",
                                        "site_b": f"site.policy.compute.max_parameters={n}"})
    _, sizes = fed.handshake()  # site_b and site_c are enough to go on
    refusal = next(m for m in grid.sent if m.has_error())
    assert refusal.error.code == protocol.ERROR_POLICY_REFUSED
    assert f"has {n:,} parameters" in refusal.error.reason and f"at most {n - 1:,}" in refusal.error.reason
    assert sorted(sizes) == ["site_b", "site_c"]


def test_the_site_worker_states_its_caps_at_start_and_a_broken_policy_stops_it_there(root: Path) -> None:
    from osteofl.client.worker import warm_up

    own = " ".join(small_overrides(root))
    assert warm_up({"site": "site_a", "overrides": f"{own} {_caps({'max_batch_size': 8})}"}).endswith(
        "compute caps: max_batch_size 8; DP: no floor (on only if a run asks for it)")
    line = warm_up({"site": "site_a", "overrides": f"{own} privacy=dp privacy.epsilon_budget=3 {_caps({'max_batch_size': 8})}"})
    assert "DP floor: noise 1.0, clip 1.0, delta 1e-05; epsilon 0.00 spent of 3.0; a round alone at batch 8 costs " in line
    assert re.search(r"costs \d+\.\d\d per ssl round \(\d+ patients\), \d+\.\d\d per task round \(\d+ patients\)$", line)
    state = root / "data" / "state" / "site_a" / "site_state.pt"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(b"not a state file")  # a damaged ledger stops the site at start, not at its first round
    with pytest.raises(StateError, match="unreadable site state"):
        warm_up({"site": "site_a", "overrides": own})
    with pytest.raises(ConfigError, match=r"site.policy.compute.max_batch_size=0 must be a whole number >= 1"):
        warm_up({"site": "site_a", "overrides": f"{own} {_caps({'max_batch_size': 0})}"})
    with pytest.raises(ConfigError, match=r"site.policy.max_lr=-1 must be a number > 0"):
        warm_up({"site": "site_a", "overrides": f"{own} site.policy.max_lr=-1"})
    site_yaml = root / "data" / "sites" / "site_b" / "site.yaml"
    site_yaml.parent.mkdir(parents=True)
    site_yaml.write_text("policy:\n  compute:\n    max_batch: 8\n")  # not a cap this version knows
    with pytest.raises(ConfigError, match=f"{site_yaml}: site.policy.compute.max_batch is not a site setting"):
        warm_up({"site": "site_b", "overrides": own})
    site_yaml.write_text("policy:\n  privacy: {enabled: true, epsilon_budget: 1.0}\n")  # an incomplete DP floor
    with pytest.raises(ConfigError, match="site.policy.privacy turns DP on but lacks noise_multiplier"):
        warm_up({"site": "site_b", "overrides": own})


def test_the_patient_split_is_the_sites_own_whatever_the_run_asks(root: Path) -> None:
    """A run with another seed or split fractions would move the site's validation and test patients into
    training. The run's seed still sets the initialisation; the split stays the site's."""
    greedy = "seed=7 data.split_seed=3 data.split.train=0.9 data.split.val=0.05 data.split.test=0.05"
    own = compose(small_overrides(root))
    eff = policy.effective_config(compose([*small_overrides(root), *greedy.split()]), own)
    assert eff.seed == 7 and eff.data.split_seed == 0 and eff.data.split.train == 0.6
    mine = dataset.load_site_data(root / "data" / "cache" / "site_a", own).splits
    theirs = dataset.load_site_data(root / "data" / "cache" / "site_a", eff).splits
    assert all(np.array_equal(mine[k], theirs[k]) for k in mine)
    _, asked = _federation(root, run=greedy)[0].handshake()
    _, plain = _federation(root)[0].handshake()
    assert asked == plain  # every site reports its own split's sizes
    assert policy.effective_config(own, compose([*small_overrides(root), "data.split_seed=5"])).data.split_seed == 5


def test_after_its_round_cap_a_site_only_evaluates_in_that_run(root: Path, caplog) -> None:
    from osteofl.client.state_store import StateStore

    own = {"site_a": "site.policy.compute.max_rounds=1"}
    fed, grid = _federation(root, node=own, **{"federation.task_rounds": 2, "federation.final_eval_split": "null"})
    with caplog.at_level("WARNING", logger="flwr"):
        first, second, third = fed.run().records
    assert "site_a" in first["site_train"] and not any("site_a" in r["site_train"] for r in (second, third))
    assert [f["reason"] for f in second["failed"]] == ["site site_a: this run's compute budget at this site is spent "
                                                       "(site.policy.compute.max_rounds=1 train rounds); not training any more in it"]
    assert all(set(r["site_eval"]) == set(SITES) for r in (first, second, third))  # it still evaluates
    assert all(len(r["site_train"]) == 2 for r in (second, third))  # the others go on
    assert any("site site_a's policy caps train rounds at 1 (this run asks 3)" in r.getMessage() for r in caplog.records)
    state = StateStore(root / "data" / "state" / "site_a", "site_a").load()
    assert state.rounds_by_run == {"0": 1}
    # a new run is a new budget
    again = Federation(LocalGrid(make_client_app(small_overrides(root)), SITES, node_overrides=own),
                       fed.cfg, run_id=5)
    assert "site_a" in again.run().records[0]["site_train"]
    assert StateStore(root / "data" / "state" / "site_a", "site_a").load().rounds_by_run == {"0": 1, "5": 1}


def test_a_site_caps_the_evaluations_a_run_may_ask_of_it(root: Path, caplog) -> None:
    """Each evaluation is a query on the site's held-out patients with a model the coordinator chose (crafted
    models could trace the patients' values): site_a answers two per run, then refuses, and trains on."""
    from osteofl.client.state_store import StateStore

    own = {"site_a": "site.policy.compute.max_evaluations=2"}
    fed, grid = _federation(root, node=own, **{"federation.task_rounds": 2})
    with caplog.at_level("WARNING", logger="flwr"):
        records = fed.run().records
    assert [sorted(r["site_eval"]) for r in records] == [sorted(SITES)] * 2 + [["site_b", "site_c"]]
    refusal = ("this run has had the 2 evaluations this site answers per run (site.policy.compute.max_evaluations); "
               "not evaluating any more in it")
    assert [f["reason"] for f in records[2]["eval_failed"]] == [refusal]
    assert all("site_a" in r["site_train"] for r in records)  # training is not evaluation: it goes on
    final = json.loads((root / "outputs" / "federated" / "final_metrics.json").read_text())
    assert set(final["sites"]) == {"site_b", "site_c"} and [f["reason"] for f in final["failed"]] == [refusal]
    assert any("site site_a's policy caps evaluations at 2 (this run asks 4)" in r.getMessage() for r in caplog.records)
    assert StateStore(root / "data" / "state" / "site_a", "site_a").load().evaluations_by_run == {"0": 2}
    assert [e["refused"] for e in audit.read(root / "data" / "state" / "site_a") if e["kind"] == "evaluate"] == \
        [None, None, refusal, refusal]


class LyingGrid(LocalGrid):
    """A coordinator that rewrites the config of every train/evaluate message it sends (``rewrite``)."""

    def __init__(self, *args, rewrite, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rewrite = rewrite

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            config = msg.content[protocol.CONFIG]
            if protocol.RUN_ID in config:
                self.rewrite(msg.metadata.message_type, config)
        return super().send_and_receive(messages, timeout=timeout)


def _rename_each_round(kind: str, config) -> None:
    """To reset each site's round budget and start a new kept model: a new declared run id per round."""
    config[protocol.RUN_ID] = f"fake-{int(config[protocol.ROUND])}"


def test_a_coordinator_that_renames_its_run_cannot_reset_a_sites_round_budget(root: Path) -> None:
    from osteofl.client.state_store import StateStore

    overrides = small_overrides(root, **{"federation.task_rounds": 2, "federation.final_eval_split": "null"})
    own = {"site_a": "site.policy.compute.max_rounds=1"}
    grid = LyingGrid(make_client_app(overrides), SITES, node_overrides=own, rewrite=_rename_each_round)
    records = Federation(grid, compose(overrides)).run().records
    assert set(records[0]["site_train"]) == set(SITES) and set(records[0]["site_eval"]) == set(SITES)
    refusal = ("the coordinator named this run 'fake-1' to this site and now names it 'fake-2': a site counts its "
               "round budget and keeps its model per run, so a run that changes its name is refused")
    assert sorted(f["reason"] for f in records[1]["failed"]) == [refusal] * len(SITES)
    assert not any(r["site_train"] for r in records[1:])  # no site trained under a new name
    for site in SITES:
        state = StateStore(root / "data" / "state" / site, site).load()
        assert state.rounds_by_run == {"fake-1": 1} and state.run_names == {str(grid.run_id): "fake-1"}
        card = json.loads((root / "data" / "state" / site / "model_card.json").read_text())
        assert card["run_id"] == "fake-1"  # the kept model was not replaced under a new name
        refused = [e["refused"] for e in audit.read(root / "data" / "state" / site) if e.get("refused")]
        assert refused == [refusal, refusal, refusal.replace("fake-2", "fake-3"), refusal.replace("fake-2", "fake-3")]


def test_a_coordinator_cannot_get_metrics_on_the_patients_a_site_trains_on(root: Path) -> None:
    """Metrics on the training rows would describe the very patients DP protects, outside epsilon. A
    coordinator whose config asks for them is stopped at start; one that rewrites its messages is refused."""
    overrides = small_overrides(root, **{"federation.final_eval_split": "null"})
    with pytest.raises(ConfigError, match="federation.eval_split=train: sites report metrics on their held-out"):
        _federation(root, **{"federation.eval_split": "train"})

    def on_training_rows(kind: str, config) -> None:
        if kind == MessageType.EVALUATE:
            config[protocol.SPLIT] = "train"

    grid = LyingGrid(make_client_app(overrides), SITES, rewrite=on_training_rows)
    records = Federation(grid, compose(overrides)).run().records
    refusal = ("the run asks for metrics on the 'train' split; this site reports metrics on its held-out patients "
               "only (val, test)")
    assert all(not r["site_eval"] and sorted(f["reason"] for f in r["eval_failed"]) == [refusal] * len(SITES) for r in records)
    evaluations = [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]
    assert evaluations and all(m.has_error() for m in evaluations)  # no metric left any site
    assert [e["refused"] for e in audit.read(root / "data" / "state" / "site_a") if e["kind"] == "evaluate"] == \
        [refusal] * len(records)


def test_under_dp_no_shared_parameter_starts_from_a_sites_private_rows(root: Path) -> None:
    """At the first task round a site set its shared sBMD head to its training patients' mean sBMD (the
    recipe's prior). Under DP that mean would leave in the update nearly unchanged, outside epsilon. With
    the learning rate at 0 the DP steps move nothing, so every site's first task update must be the global
    model exactly; without DP (the control) each site's update carries its own prior."""
    def first_task_updates(run: str = "") -> dict[str, dict[str, np.ndarray]]:
        fed, grid = _federation(root, run=run, **{"train.lr": 0.0, "federation.final_eval_split": "null"})
        fed.run()
        task = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN
                and not m.has_error() and protocol.ARRAYS in m.content.array_records][-len(SITES):]
        return {m.content[protocol.SITE]["name"]: protocol.payload_of(m.content) for m in task}

    bias = "heads.sbmd.bias"
    plain = first_task_updates()
    priors = {s: float(plain[s][bias][0]) for s in SITES}
    assert len(set(priors.values())) == len(SITES)  # each site's own mean: the control can see the leak
    private = first_task_updates("privacy=dp privacy.epsilon_budget=1000")
    reference = private["site_a"]
    assert all(np.array_equal(private[s][k], reference[k]) for s in SITES for k in reference)
    assert all(float(reference[bias][0]) != prior for prior in priors.values())


def test_dp_rounds_do_not_build_on_local_parts_trained_without_dp(root: Path) -> None:
    """A site that trained without DP and then gets a DP floor: its local parts (and Adam's moments of
    unclipped gradients) carry its training patients into every DP update, outside epsilon. The DP round
    starts them afresh; with the learning rate at 0 they stay exactly as a site that never trained has them."""
    from osteofl.client.state_store import StateStore

    fed, _ = _federation(root, **{"federation.final_eval_split": "null"})
    fed.run()
    store = {s: StateStore(root / "data" / "state" / s, s) for s in SITES}
    before = {s: store[s].load() for s in SITES}
    assert all(st.non_private_rounds == 2 and st.accountant is None for st in before.values())
    own = {s: "privacy=dp privacy.epsilon_budget=1000" for s in SITES}
    fed, _ = _federation(root, node=own, **{"train.lr": 0.0, "federation.final_eval_split": "null",
                                            "federation.run_name": "with_dp"})
    fed.run()
    cfg = compose(small_overrides(root))
    for s in SITES:
        after = store[s].load()
        data = dataset.load_site_data(root / "data" / "cache" / s, cfg)
        fresh = osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer)
        osteo.standardise_on_site(fresh, data)
        fresh_local = osteo.local_state(fresh)
        moved = [k for k in fresh_local if not torch.equal(before[s].local[k], fresh_local[k])]
        assert moved  # the first run trained the local parts: the check below can tell
        assert all(torch.equal(after.local[k], fresh_local[k]) for k in fresh_local)
        assert after.non_private_rounds == 0 and after.epsilon > 0


# --- a coordinator that lies: what leaves through training, the run's overrides, the message's types -----------
def _global_model(root: Path, overrides: list[str]) -> dict[str, np.ndarray]:
    """The payload a coordinator would broadcast: a fresh site model's shared arrays."""
    from osteofl.client.site_session import SiteSession

    node = {"site": "site_a", "state-dir": str(root / "scratch_state")}
    session = SiteSession.open(Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}), overrides)
    return protocol.payload_arrays(session.model, session.cfg)


def test_without_dp_a_site_trains_on_no_batch_smaller_than_its_cohort(root: Path) -> None:
    """The audit's h_one_patient: with train.batch_size=1, one local step and a global model whose sBMD head is
    a constant c, a train reply's sBMD loss was one vertebra's ((c - sBMD)/0.15)^2, and two rounds gave that
    sBMD exactly. Below the site's min_cohort (5 here) such a request is refused before anything trains;
    at the floor, or under DP (epsilon bounds any batch), the site trains."""
    # the app's own overrides would win over the run's: leave the batch and the steps to the run
    overrides = [o for o in small_overrides(root) if not o.startswith(("train.batch_size=", "federation.local_steps="))]
    app, state = make_client_app(overrides), root / "data" / "state" / "site_a"
    arrays = _global_model(root, overrides)
    arrays["heads.sbmd.weight"] = np.zeros_like(arrays["heads.sbmd.weight"])  # predicts a constant for everyone
    ask = {protocol.PHASE: "task", protocol.ROUND: 3, protocol.RUN_ID: "R"}
    refused = _ask(app, "train", ask, {"site": "site_a"}, run="train.batch_size=4 federation.local_steps=1", arrays=arrays)
    assert refused.error.code == protocol.ERROR_POLICY_REFUSED
    assert refused.error.reason == ("train.batch_size=4 is below this site's floor for training without DP: batches of "
                                    "site.policy.min_cohort=5 crops")
    assert not (state / "site_state.pt").exists()  # nothing trained, nothing saved
    (entry,) = audit.read(state)
    assert entry["kind"] == "train" and entry["refused"] and entry["round"] == 3
    trained = _ask(app, "train", ask, {"site": "site_a"}, run="train.batch_size=5 federation.local_steps=1", arrays=arrays)
    assert not trained.has_error() and math.isfinite(trained.content[protocol.METRICS]["train_sbmd"])
    site = compose(overrides)
    assert policy.check_train_batch(policy.effective_config(compose([*overrides, "train.batch_size=1", "privacy=dp"]), site)) is None
    capped = compose([*overrides, "site.policy.compute.max_batch_size=4"])  # the site's own cap under its own floor
    with pytest.raises(policy.PolicyRefusal, match=r"cap site.policy.compute.max_batch_size=4 is below it"):
        policy.check_train_batch(policy.effective_config(compose(overrides), capped))


def test_a_deployed_sites_batch_order_is_its_own_secret(root: Path) -> None:
    """The run's seed is the coordinator's: were a site's batches drawn from it alone, with the handshake's
    pool sizes the coordinator would know which rows each batch holds, and differencing replies over seeds
    would isolate every row. Two hospitals' sites with the same data, config, seed and global model draw
    different batches (each keys its order with its own salt, kept in its state); two simulated sites
    (Flower's simulation engine) deliberately keep the seed's order, batch for batch."""
    from osteofl.client.state_store import StateStore

    overrides = small_overrides(root, **{"federation.local_steps": 1})
    app, arrays = make_client_app(overrides), _global_model(root, overrides)
    ask = {protocol.PHASE: "ssl", protocol.ROUND: 1, protocol.RUN_ID: "R"}
    states = {name: root / "states" / name for name in ("hospital_1", "hospital_2", "sim_1", "sim_2")}
    node = {name: {"site": "site_a"} if name.startswith("hospital") else {"partition-id": 0} for name in states}
    replies = {name: _ask(app, "train", ask, {**node[name], "state-dir": str(states[name])}, arrays=arrays) for name in states}
    losses = {name: dict(reply.content[protocol.METRICS]) for name, reply in replies.items()}
    assert losses["hospital_1"]["train_loss"] != losses["hospital_2"]["train_loss"]
    assert losses["sim_1"] == losses["sim_2"]
    salts = {name: StateStore(folder, "site_a").load().shuffle_salt for name, folder in states.items()}
    assert all(re.fullmatch(r"[0-9a-f]{32}", salts[n]) for n in ("hospital_1", "hospital_2"))
    assert salts["hospital_1"] != salts["hospital_2"] and salts["sim_1"] is None and salts["sim_2"] is None


def test_a_coordinator_cannot_read_a_sites_environment_through_its_overrides(root: Path, monkeypatch) -> None:
    """The audit's a_env_exfil: ``${oc.env:NAME}`` in a run override was resolved at the site, and the
    value came back in Error 903 ("model.encoder='<value>': expected small_cnn or resnet10"). A run
    override with an interpolation is refused (902) before anything composes it, and audited."""
    monkeypatch.setenv("OSTEO_TEST_HOSPITAL_SECRET", "s3cr3t-Passw0rd")
    app, state = make_client_app(small_overrides(root)), root / "data" / "state" / "site_a"
    for run in ("model.encoder=${oc.env:OSTEO_TEST_HOSPITAL_SECRET}", "model.dropout=${oc.env:OSTEO_TEST_HOSPITAL_SECRET}",
                "train.lr=0.1 'site.name=a${oc.env:OSTEO_TEST_HOSPITAL_SECRET}'"):
        reply = _ask(app, "query", {protocol.PHASE: "handshake"}, {"site": "site_a", "state-dir": str(state)}, run=run)
        assert reply.error.code == protocol.ERROR_POLICY_REFUSED, reply.error.reason
        assert "s3cr3t" not in reply.error.reason and "holds an interpolation" in reply.error.reason
    assert len(audit.read(state)) == 3 and "s3cr3t" not in (state / audit.AUDIT_FILE).read_text()


def test_a_message_with_instructions_of_the_wrong_type_is_refused_and_audited(root: Path) -> None:
    """The audit's g_audit_round: a round of "x" made the audit's int() raise after the reply was made, so the
    reply bypassed the site's vetting and its audit log, and the site worker dropped the request. Each
    instruction of the wrong type is now refused (902) before the handler runs, and every reply audited."""
    app, state = make_client_app(small_overrides(root)), root / "data" / "state" / "site_a"
    cases = [("query", {protocol.PHASE: "handshake", protocol.ROUND: "x"}, "'round' is a str"),
             ("evaluate", {protocol.SPLIT: "val", protocol.ROUND: [1, 2], protocol.RUN_ID: "A"}, "'round' is a list"),
             ("evaluate", {protocol.SPLIT: "val", protocol.ROUND: True}, "'round' is a bool"),
             ("train", {protocol.PHASE: 1, protocol.ROUND: 1}, "'phase' is a int"),
             ("evaluate", {protocol.N_SITES: "3", protocol.RUN_ID: 7}, "'n-sites' is a str"),
             ("train", {protocol.PHASE: "ssl", protocol.ROUND: 1, protocol.PROXIMAL_MU: "0.1"}, "'proximal-mu' is a str"),
             ("train", {protocol.ROUND: 1}, "the train message does not say its 'phase'"),  # was a bare KeyError
             ("train", {protocol.PHASE: "ssl"}, "the train message does not say its 'round'")]
    for kind, config, reason in cases:
        reply = _ask(app, kind, config, {"site": "site_a"})
        assert reply.error.code == protocol.ERROR_POLICY_REFUSED and reason in reply.error.reason, reply.error.reason
    entries = audit.read(state)
    assert [e["kind"] for e in entries] == [kind for kind, _, _ in cases]
    assert all(e["refused"] and e["round"] in (None, 1) for e in entries)
    assert not (state / "site_state.pt").exists()  # refused before a handler counted or saved anything


def test_a_run_out_of_range_is_refused_by_name_and_audited_before_anything_trains(root: Path) -> None:
    """The audit's f1_dp_budget_bypass: federation.local_steps=-1000 passed the site's DP pre-check (costed at
    no step) while training still took one, which put epsilon at 3.4 over the site's budget of 0.3. Every
    setting out of its range (config.check_ranges), or unknown, is refused (902) naming it, before anything
    trains, and the refusal is audited in the site's state folder, found from its own config."""
    overrides = [o for o in small_overrides(root) if not o.startswith(("train.batch_size=", "federation.local_steps="))]
    app, state = make_client_app(overrides), root / "data" / "state" / "site_a"
    node = {"site": "site_a", "overrides": "privacy=dp privacy.epsilon_budget=0.3"}
    ask = {protocol.PHASE: "ssl", protocol.ROUND: 1, protocol.RUN_ID: "R"}
    cases = {"federation.local_steps=-1000": "federation.local_steps=-1000: must be >= 1",
             "train.eval_batch_size=0": "train.eval_batch_size=0: must be >= 1",
             "privacy=dp privacy.max_grad_norm=-1": "privacy.max_grad_norm=-1: must be > 0",
             "train.num_workers=4": "Could not override 'train.num_workers'."}
    for run, problem in cases.items():
        reply = _ask(app, "train", ask, node, run=run, arrays=_global_model(root, overrides))
        assert reply.error.code == protocol.ERROR_POLICY_REFUSED
        assert reply.error.reason == f"the run's config is refused: {problem}"
    assert [e["refused"] for e in audit.read(state)] == [f"the run's config is refused: {p}" for p in cases.values()]
    assert not (state / "site_state.pt").exists()  # no step, no epsilon spent
    honest = _ask(app, "train", ask, node, run="federation.local_steps=1", arrays=_global_model(root, overrides))
    assert honest.error.code == protocol.ERROR_BUDGET_SPENT and "over the budget 0.3" in honest.error.reason


def test_a_run_faster_than_the_sites_max_lr_is_refused_and_its_local_parts_kept(root: Path) -> None:
    """The audit's t4_local_lr: one round at train.local_lr_factor=1e6 threw the site's local expert and
    calibration to |w| ~ 1e3 (finite, so saved) and every later validation bias to -1e6. AdamW moves a weight
    by about the learning rate per step, so the site's ``max_lr`` bounds what one round can do to its parts."""
    from osteofl.client.state_store import StateStore

    app, state = make_client_app(small_overrides(root)), root / "data" / "state" / "site_a"
    arrays, ask = _global_model(root, small_overrides(root)), {protocol.PHASE: "task", protocol.ROUND: 2, protocol.RUN_ID: "R"}
    assert not _ask(app, "train", ask, {"site": "site_a"}, arrays=arrays).has_error()
    before = StateStore(state, "site_a").load()
    reply = _ask(app, "train", ask, {"site": "site_a"}, run="train.local_lr_factor=1e6", arrays=arrays)
    assert reply.error.code == protocol.ERROR_POLICY_REFUSED
    assert reply.error.reason == ("the run trains a parameter group at a learning rate of 1000 (train.lr=0.001 x "
                                  "train.local_lr_factor=1e+06); this site allows at most 0.05 (site.policy.max_lr): "
                                  "its local parts would be thrown far in one round")
    after = StateStore(state, "site_a").load()
    assert after.revision == before.revision and all(torch.equal(after.local[k], v) for k, v in before.local.items())
    own = {"site": "site_a", "overrides": "site.policy.max_lr=0.005"}  # the hospital's own, stricter cap
    assert "at most 0.005" in _ask(app, "train", ask, own, arrays=arrays).error.reason  # default 1e-3 x 10 = 0.01
    broken = compose([*small_overrides(root), "site.policy.max_lr=0"])  # the hospital's own typo: found at start
    with pytest.raises(ConfigError, match=r"site.policy.max_lr=0 must be a number > 0"):
        policy.effective_config(broken, broken)


def test_two_new_runs_cannot_push_the_hospitals_validated_model_off_its_disk(root: Path) -> None:
    """The audit's t5_evict: each new run's first (unjudged) model set the kept one aside, one generation deep,
    so two one-message runs sending an all-zero model destroyed the model the hospital had validated. The
    model set aside is now the one worth more: judged, and no worse on the same validation patients."""
    from osteo_model.checkpoints import PREVIOUS_SITE_MODEL_FILE, SITE_MODEL_FILE, VAL_PATIENTS, worth_more

    app, state = make_client_app(small_overrides(root)), root / "data" / "state" / "site_a"
    honest = _global_model(root, small_overrides(root))
    judged = _ask(app, "evaluate", {protocol.SPLIT: "val", protocol.ROUND: 2, protocol.RUN_ID: "real"},
                  {"site": "site_a"}, arrays=honest)
    assert not judged.has_error()
    validated = (state / SITE_MODEL_FILE).read_bytes()
    junk = {k: np.zeros_like(v) for k, v in honest.items()}
    for flower_run, run in ((2, "junk-1"), (3, "junk-2")):  # judged on no patient: an SSL round's, a new run's first
        reply = _ask(app, "evaluate", {protocol.SPLIT: "val", protocol.ROUND: 1, protocol.RUN_ID: run}, {"site": "site_a"},
                     arrays=junk, flower_run=flower_run)
        assert not reply.has_error() and json.loads((state / "model_card.json").read_text())["run_id"] == run
        assert (state / PREVIOUS_SITE_MODEL_FILE).read_bytes() == validated
    # a later run's model judged strictly better on the same validation patients takes its place in turn; a
    # judgement on other patients does not compare (the later model wins, as without one)
    card = lambda score, val="v": {"selection": {"score": score}, VAL_PATIENTS: val}  # noqa: E731
    assert worth_more(card(0.1), card(None)) and worth_more(card(0.1), card(0.1)) and not worth_more(card(0.1), card(0.09))
    assert not worth_more(card(0.1), card(0.2, val="w")) and not worth_more(card(None), card(0.2))
