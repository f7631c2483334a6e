"""osteo-evidence's run cache: what its key covers (what changes training and evaluation, the data by
content) and what it leaves out (deployment-only settings); the model selection it keeps per site (each
task round's validation score, the round kept) and how the report shows it."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from cache_factory import make_site_cache
from federation_helpers import small_overrides
from osteo_model import model as osteo, training
from osteo_model.config import compose
from osteo_model.dataset import load_site_data
from osteofl.simulation import evidence, evidence_report as report
from osteofl.simulation.evidence_methods import MethodRun, Selector, federated, hu_rule

NO_DATA = "data"


def _key(tmp_path, *overrides: str) -> str:
    return evidence._config_key(compose([*small_overrides(tmp_path), *overrides]), NO_DATA)


@pytest.mark.parametrize("override", [
    "federation.reply_poll_s=1.5", "federation.superlink.port=1234", "federation.round_timeout=5",
    "federation.robust.max_update_norm=null", "federation.simulation.client_cpus=2", "federation.run_name=other",
    "paths.root=/elsewhere", "paths.outputs=/elsewhere/out", "synth.n_jobs=3", "radiomics.n_jobs=3",
    "site.policy.min_cohort=20", "predict.png_dpi=200", "federation.min_train_replies=3"])
def test_deployment_only_settings_keep_the_key(tmp_path, override):
    assert _key(tmp_path, override) == _key(tmp_path)


@pytest.mark.parametrize(("setting", "other"), [
    ("train.final_refit_epochs", 5), ("train.eval_batch_size", 4), ("data.split_seed", 4), ("train.loss.local_prior", 8.0)])
def test_a_later_setting_keeps_the_key_only_at_its_neutral_value(tmp_path, setting, other):
    """Settings that came after the benchmark's runs (evidence.NEUTRAL_LATER): at the value the runs had
    the runs stay cached, at any other value the method is trained again."""
    before = compose(small_overrides(tmp_path))
    parent, _, leaf = setting.rpartition(".")
    with open_dict(before):  # the config as it was when the runs were made
        del OmegaConf.select(before, parent)[leaf]
        del before.predict["batch_size"]  # came with train.eval_batch_size (osteo-predict's: in no key)
    key = evidence._config_key(before, NO_DATA)
    neutral = evidence.NEUTRAL_LATER[setting]
    assert _key(tmp_path, f"{setting}={'null' if neutral is None else neutral}") == key != _key(tmp_path, f"{setting}={other}")


@pytest.mark.parametrize("override", [
    "federation.task_rounds=9", "federation.ssl_rounds=3", "federation.local_steps=7", "train.lr=0.5", "seed=3",
    "federation.strategy=fedprox", "federation.strategy_args.fedprox.proximal_mu=0.5", "federation.share_all=true",
    "federation.personal_prefixes=[heads.]", "model.embed_dim=8", "train.fit_local_epochs=2",
    "data.label_fraction=0.5", "synth.labeled_per_site=7", "crop.size=8", "device=cpu"])
def test_what_changes_training_changes_the_key(tmp_path, override):
    assert _key(tmp_path, override) != _key(tmp_path)


def test_every_left_out_setting_exists():
    """A misspelt name would leave nothing out, silently."""
    cfg = compose([])
    missing = [n for n in evidence.NOT_TRAINING if OmegaConf.select(cfg, n, default="<none>") == "<none>"]
    assert missing == []


def test_the_data_enter_the_key_by_content_not_by_place(tmp_path):
    cfg = compose(small_overrides(tmp_path))
    one, moved, other = (make_site_cache(tmp_path / d / "site_a", n_patients=6, size=8, seed=s)
                         for d, s in (("one", 0), ("moved", 0), ("other", 1)))
    keys = [evidence._data_key({"site_a": load_site_data(p, cfg)}) for p in (one, moved, other)]
    assert keys[0] == keys[1] != keys[2]
    assert evidence._config_key(cfg, keys[0]) != evidence._config_key(cfg, keys[2])


def _tiny(tmp_path, n_sites: int = 1):
    cfg = compose(small_overrides(tmp_path, **{"federation.task_rounds": 3}))
    datas = {s: load_site_data(make_site_cache(tmp_path / "cache" / s, site=s, n_patients=12, size=8, seed=i), cfg)
             for i, s in enumerate(["site_a", "site_b"][:n_sites])}
    return cfg, datas


def test_selector_keeps_each_rounds_validation_score_and_the_round_it_uses(tmp_path):
    cfg, datas = _tiny(tmp_path)
    data = datas["site_a"]
    model = osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer)
    osteo.standardise_on_site(model, data)
    selector = Selector(["site_a"])
    for shift in (0.3, 0.05, 0.15):  # the calibration residual moves every prediction by this much (g/cm2)
        with torch.no_grad():
            model.calibration.residual.bias.fill_(shift)
        selector.update({"site_a": model}, datas, cfg, "cpu")
    history = selector.history["site_a"]
    assert len(history) == 3 and len(set(history)) == 3 and all(np.isfinite(history))
    run = selector.outcome({"site_a": model}, datas, cfg, "cpu", [1.0, 2.0, 3.0])
    assert run.val_history == {"site_a": history} and run.selected_round == {"site_a": int(np.argmin(history)) + 1}
    assert "refit_epoch" not in run.diagnostics["site_a"]  # no final refit unless asked for
    # the model that predicted the test split is the kept round's: its validation score is that round's
    assert training.evaluate(model, data, cfg, "val", "cpu")[training.SELECTION_METRIC] == pytest.approx(min(history))
    # asked for, the refit starts from the kept round and keeps an epoch only if the validation patients improve
    refit = compose(small_overrides(tmp_path, **{"federation.task_rounds": 3, "train.final_refit_epochs": 2}))
    run = selector.outcome({"site_a": model}, datas, refit, "cpu", [1.0, 2.0, 3.0])
    assert run.diagnostics["site_a"]["refit_epoch"] in (0, 1, 2)
    after = training.evaluate(model, data, cfg, "val", "cpu")[training.SELECTION_METRIC]
    assert after == pytest.approx(min(history)) if run.diagnostics["site_a"]["refit_epoch"] == 0 else after < min(history)


def test_a_trained_method_saves_and_reloads_its_selection(tmp_path):
    cfg, datas = _tiny(tmp_path, n_sites=2)
    run = federated(cfg, datas, "cpu")
    assert set(run.val_history) == set(datas) and all(len(h) == 3 for h in run.val_history.values())
    for site, history in run.val_history.items():
        assert run.selected_round[site] == int(np.nanargmin(history)) + 1
    path, key = tmp_path / "runs" / "osteofl.npz", evidence._config_key(cfg, evidence._data_key(datas))
    evidence._save_run(path, key, run, 5.0)
    loaded, seconds = evidence._load_run(path, key)
    assert seconds == 5.0 and loaded.val_history == run.val_history and loaded.selected_round == run.selected_round
    rule = evidence._cached(tmp_path / "runs" / "hu_rule.npz", key, lambda: hu_rule(cfg, datas, "cpu"))[0]
    assert rule.val_history == {} and rule.selected_round == {}  # nothing to select: nothing saved, loads as such
    assert evidence._load_run(tmp_path / "runs" / "hu_rule.npz", key)[0].val_history == {}


def test_a_run_cached_without_selection_is_trained_again(tmp_path):
    """Files of the previous format (no validation history) carry an older key: trained again, not misread."""
    cfg, datas = _tiny(tmp_path)
    path, key = tmp_path / "osteofl.npz", evidence._config_key(cfg, evidence._data_key(datas))
    old = MethodRun(hu_rule(cfg, datas, "cpu").predictions, [1.0])
    evidence._save_run(path, "key of a format-2 run", old, 1.0)
    made: list[MethodRun] = []

    def train() -> MethodRun:
        made.append(MethodRun(old.predictions, [2.0], val_history={"site_a": [0.2, 0.1]}, selected_round={"site_a": 2}))
        return made[-1]

    run, _, earlier = evidence._cached(path, key, train)
    assert not earlier and run is made[0]
    assert evidence._load_run(path, key)[0].selected_round == {"site_a": 2}


def test_selection_report_flags_a_kept_last_round():
    nan = float("nan")
    histories = {0: {"osteofl": {"a": [0.3, 0.2, 0.1], "b": [0.2, 0.1, 0.3]}, "hu_rule": {}},
                 1: {"osteofl": {"a": [0.3, 0.25, 0.28], "b": [nan, nan, nan]}, "hu_rule": {}}}
    selected = {0: {"osteofl": {"a": 3, "b": 2}, "hu_rule": {}}, 1: {"osteofl": {"a": 2, "b": 0}, "hu_rule": {}}}
    out = report.summarise_selection(histories, selected, "patient_mae_bmd")
    assert set(out["methods"]) == {"osteofl"}
    a, b = out["methods"]["osteofl"]["a"], out["methods"]["osteofl"]["b"]
    assert a["selected_round"] == [3, 2] and a["task_rounds"] == [3, 3] and a["at_last_round"] == [0]
    assert b["selected_round"] == [2, None] and b["at_last_round"] == [] and b["val_history"][1] == [None] * 3
    md = report.markdown({"experiment": "x", "scenarios": {"s": {
        "reference": "osteofl", "seeds": [0, 1], "sites": [], "metrics": {}, "differences": {}, "selection": out}}}, {})
    assert "| osteofl | a | 3/3*, 2/3 | 1 of 2 | 0.175 |" in md  # mean of 0.1 and 0.25
    assert "| osteofl | b | 2/3, n/a | 0 of 2 | 0.100 |" in md


def test_an_onboarding_only_setting_keeps_the_method_runs_and_remakes_the_curve(tmp_path, monkeypatch):
    """``onboarding.overrides`` (train.fit_local_shared_lr_factor) reach the onboarding alone: the methods'
    run keys stay, the curve is made again for another value, or from other weights, and saved beside the
    default recipe's."""
    assert _key(tmp_path, "train.fit_local_shared_lr_factor=0.1") == _key(tmp_path)
    cfg, datas = _tiny(tmp_path)
    got: list[float] = []

    def curve(ccfg, ext, payload, ks, device):
        got.append(float(ccfg.train.fit_local_shared_lr_factor))
        return hu_rule(ccfg, {"site_a": ext}, device)

    monkeypatch.setattr(evidence.onboarding, "curve", curve)
    said: list[str] = []
    unit = evidence.UnitData([*small_overrides(tmp_path)], cfg, datas, evidence._data_key(datas))
    runs = {"osteofl": MethodRun({})}

    def onboard(name: str, own: list[str]) -> None:
        exp = OmegaConf.create({"name": name, "methods": {"osteofl": {"engine": "federated"}},
                                "onboarding": {"method": "osteofl", "labeled_patients": [2], "overrides": own}})
        plan = SimpleNamespace(exp=exp, store=tmp_path / "store")
        evidence._onboard(plan, unit, tmp_path / "runs", runs, datas["site_a"], said.append)

    onboard("evidence", [])
    onboard("ft", ["train.fit_local_shared_lr_factor=0.1"])
    onboard("ft", ["train.fit_local_shared_lr_factor=0.1"])
    onboard("ft", ["train.fit_local_shared_lr_factor=0.2"])
    runs["osteofl"].payload = {"w": np.ones(3, np.float32)}  # the method was trained again: other weights
    onboard("ft", ["train.fit_local_shared_lr_factor=0.2"])
    assert got == [0.0, 0.1, 0.2, 0.2] and "done earlier" in said[2]
    assert sorted(p.name for p in (tmp_path / "runs").glob("*.npz")) == ["onboarding-ft.npz", "onboarding.npz"]


def test_the_report_shows_the_final_refit_per_seed_only_where_a_method_ran_one():
    diags = {0: {"osteofl": {"a": {"gate_local": 0.1}}, "osteofl_refit": {"a": {"gate_local": 0.1, "refit_epoch": 4.0}}},
             1: {"osteofl": {"a": {"gate_local": 0.2}}, "osteofl_refit": {"a": {"gate_local": 0.2, "refit_epoch": 0.0}}}}
    with_refit = report._md_diagnostics(report.summarise_diagnostics(diags, {}, []), {})
    assert any("final refit" in line for line in with_refit)
    assert "| osteofl_refit | a | 0.150 | n/a | n/a | n/a | n/a | 4, 0 |" in with_refit
    assert "| osteofl | a | 0.150 | n/a | n/a | n/a | n/a | n/a |" in with_refit
    without = report._md_diagnostics(report.summarise_diagnostics({0: {"osteofl": diags[0]["osteofl"]}}, {}, []), {})
    assert not any("final refit" in line for line in without)
