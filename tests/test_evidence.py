"""The evidence benchmark's pipeline (osteo-evidence) end to end on tiny fake caches: the files, every method
and site, ordered intervals and paired differences, the methods' diagnostics, the round each kept and the
external site's onboarding curve. It checks the pipeline, not what the methods achieve."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cache_factory import make_site_cache
from federation_helpers import SITES, make_caches, small_overrides
from osteo_model import model as osteo, run_lock
from osteo_model.config import compose
from osteo_model.dataset import load_site_data
from osteo_model.errors import ConfigError
from osteofl.simulation import evidence
from osteofl.simulation.evidence_diagnostics import simulated_dxa_bias
from osteofl.simulation.evidence_methods import site_outcome
from osteofl.simulation.evidence_onboarding import labeled_counts, point_name

EXTERNAL = "site_ext"


def _experiment(tmp_path: Path, **extra: str) -> Path:
    path = tmp_path / "tiny.yaml"
    lines = ["base: evidence_quick", "name: tiny", "data: as_configured", "bootstrap: 50"]
    path.write_text("\n".join([*lines, *(f"{k}: {v}" for k, v in extra.items())]) + "\n")
    return path


@pytest.mark.slow
def test_quick_experiment_writes_every_method_site_and_interval(tmp_path):
    root = make_caches(tmp_path, n_patients=24)
    make_site_cache(root / "data" / "cache" / EXTERNAL, site=EXTERNAL, n_patients=24, size=12,
                    manufacturer="hologic", device_bias=0.05, seed=9)
    overrides = small_overrides(root, **{"federation.task_rounds": 2})  # two rounds to select from
    result = evidence.run(str(_experiment(tmp_path)), overrides, log=lambda _: None)
    out = root / "outputs" / "tiny"
    for name in ("evidence.md", "forest.png", "onboarding.png"):
        assert (out / name).stat().st_size > 0, name
    written = json.loads((out / "evidence.json").read_text())
    assert written["scenarios"].keys() == result["scenarios"].keys() == {"default"}
    sc = written["scenarios"]["default"]
    methods = set(evidence.load_experiment("evidence_quick").methods)
    assert set(sc["metrics"]) == methods and set(sc["differences"]) == methods - {"osteofl"}
    assert sc["seeds"] == [0, 1]
    groups = {*SITES, "pooled"}
    checked = 0
    for table in (sc["metrics"], sc["differences"]):
        for method, by_group in table.items():
            assert set(by_group) == groups, method
            for group, values in by_group.items():
                assert {"acc3", "auc", "mae", "r"} <= set(values), (method, group)
                for name, iv in values.items():
                    if iv["point"] is None:
                        continue
                    assert iv["lo"] <= iv["point"] <= iv["hi"], (method, group, name, iv)
                    checked += 1
    assert checked > 100
    # the BMD-free rule has no BMD metrics; every BMD-predicting method has them at every site
    assert sc["metrics"]["hu_rule"]["pooled"]["mae"]["point"] is None
    assert all(sc["metrics"][m][s]["mae"]["point"] is not None for m in methods - {"hu_rule"} for s in SITES)
    # per-device bias: one device per fake site, all three in the pooled figures
    assert {"bias_hologic", "bias_ge_lunar", "bias_norland"} <= set(sc["differences"]["fedavg"]["pooled"])
    assert np.isfinite(written["seconds"]["total"]) and written["round_seconds"]["osteofl"]
    # what the figures depend on beyond code and seed: the same commit on another CPU trains other weights
    env = written["environment"]
    assert env["torch"] == torch.__version__ and env["cpu_capability"] and env["cpu"] and env["numpy"] == np.__version__
    # the experiment's goals, judged on this report's own numbers
    judged = written["goals"]["default"]
    assert len(judged) == 5 and all(row["met"] in (True, False, None) for row in judged)
    assert set(judged[0]["groups"]) == set(SITES) and "## Goals" in (out / "evidence.md").read_text(encoding="utf-8")
    md = (out / "evidence.md").read_text(encoding="utf-8")
    assert "Paired differences" in md and "FedPer (local heads)" in md and "L1-HU rule" in md
    assert "no manufacturer in gate" in md and "What the site-local parts do" in md and "Onboarding the external" in md
    _check_diagnostics(sc["diagnostics"])
    _check_selection(sc["selection"], md)
    _check_onboarding(sc["onboarding"], compose(overrides), n_seeds=2)
    # a rerun trains nothing: every method's run and the onboarding curve of each seed were kept, and give
    # the same figures
    lines: list[str] = []
    again = evidence.run(str(_experiment(tmp_path)), overrides, log=lines.append)
    assert sum("done earlier" in line for line in lines) == 2 * (len(methods) + 1)
    assert again["scenarios"] == json.loads(json.dumps(result["scenarios"]))


def _check_diagnostics(diag: dict) -> None:
    """Every trained method has finite diagnostics at every site in every seed; the rules have none; the
    whole-model FedAvg variants are marked as averaging their local parts; fake caches have no truth."""
    trained = {"osteofl", "fedavg", "osteofl_nometa", "fedavg_nometa", "fedprox", "fedper", "local_only", "central"}
    assert set(diag["methods"]) == trained
    assert set(diag["averaged"]) == {"fedavg", "fedavg_nometa", "fedprox"}
    for method, by_site in diag["methods"].items():
        assert set(by_site) == set(SITES), method
        for site, values in by_site.items():
            assert set(values) == {"gate_local", "calibration_shift", "local_expert_shift"}, (method, site)
            for name, entry in values.items():
                assert len(entry["per_seed"]) == 2 and all(np.isfinite(v) for v in entry["per_seed"]), (method, site, name)
                assert entry["mean"] == pytest.approx(np.mean(entry["per_seed"]))
            assert all(0.0 < v < 1.0 for v in values["gate_local"]["per_seed"])
    assert diag["simulated"] == {}


def _check_selection(selection: dict, md: str) -> None:
    """Every trained method kept one of its task rounds per site and seed (evidence_quick: 2), with each
    round's validation score; the rules select nothing."""
    trained = {"osteofl", "fedavg", "osteofl_nometa", "fedavg_nometa", "fedprox", "fedper", "local_only", "central"}
    assert selection["metric"] == "patient_mae_bmd" and set(selection["methods"]) == trained
    for method, by_site in selection["methods"].items():
        assert set(by_site) == set(SITES), method
        for entry in by_site.values():
            assert entry["seeds"] == [0, 1] and entry["task_rounds"] == [2, 2]
            for kept, history in zip(entry["selected_round"], entry["val_history"]):
                assert len(history) == 2 and kept == 1 + int(np.argmin(history)), (method, history)
            assert entry["at_last_round"] == [sd for sd, k in zip(entry["seeds"], entry["selected_round"]) if k == 2]
    assert "Model selection: the task round kept per site" in md


def _check_onboarding(onb: dict, cfg, n_seeds: int) -> None:
    """One point per requested k capped at the external site's labeled training patients, plus shared-only;
    onboarding never worse than shared-only on the site's own validation patients."""
    assert onb["site"] == EXTERNAL and onb["method"] == "osteofl"
    ext = load_site_data(Path(cfg.paths.cache_root) / EXTERNAL, cfg)
    available = ext.cache.table["patient_id"].iloc[ext.splits["train"]].nunique()
    assert 5 < available < 20  # the list [2, 5, 10, 20, 40] must be capped
    ks = labeled_counts(evidence.load_experiment("evidence_quick").onboarding.labeled_patients, available)
    assert ks[-1] == available and len(ks) == len(set(ks))
    assert list(onb["points"]) == ["shared_only", *(f"k{k}" for k in ks[:-1]), "all"]
    for name, point in onb["points"].items():
        assert point["seeds"] == list(range(n_seeds)), name
        for metric in ("auc", "acc3", "mae"):
            iv = point["metrics"][metric]
            if iv["point"] is not None:
                assert iv["lo"] <= iv["point"] <= iv["hi"], (name, metric)
        assert point["metrics"]["mae"]["point"] is not None and np.isfinite(point["metrics"]["mae"]["point"])
        assert np.isfinite(point["calibration_shift"]["mean"]) and 0 < point["gate_local"]["mean"] < 1
        if name == "shared_only":
            assert point["labeled_patients"]["mean"] == 0 and "difference" not in point
            assert abs(point["local_expert_shift"]["mean"]) < 1e-6  # fresh local expert: the shared mixture
            continue
        k = available if name == "all" else int(name[1:])
        assert point["labeled_patients"]["per_seed"] == [float(k)] * n_seeds
        for sel, base in zip(point["val_patient_mae_bmd_selected"]["per_seed"],
                             point["val_patient_mae_bmd_shared_only"]["per_seed"]):
            assert sel <= base
        kept = [sd for sd, ep in enumerate(point["selected_epoch"]["per_seed"]) if ep == 0]
        assert point["kept_shared_only"] == kept
        assert point["difference"]["mae"]["point"] is not None


def test_diagnostics_measure_what_the_local_parts_add(tmp_path):
    cache = make_site_cache(tmp_path / "cache" / "site_a", n_patients=12, size=12)
    cfg = compose(small_overrides(tmp_path))
    data = load_site_data(cache, cfg)
    model = osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer)
    fresh = site_outcome(model, data, cfg, "cpu")[1]
    assert fresh["calibration_shift"] == 0.0 and fresh["local_expert_shift"] == 0.0  # both start at zero
    assert 0.0 < fresh["gate_local"] < 0.5
    with torch.no_grad():
        model.calibration.residual.bias.fill_(0.03)
        model.local_expert[2].bias.fill_(1.0)
    moved = site_outcome(model, data, cfg, "cpu")[1]
    assert moved["calibration_shift"] == pytest.approx(0.03, abs=1e-6)  # the residual adds 0.03 g/cm2 everywhere
    assert abs(moved["local_expert_shift"]) > 1e-4 and moved["gate_local"] == pytest.approx(fresh["gate_local"])


def test_simulated_dxa_bias_reads_the_synthetic_truth(tmp_path):
    (tmp_path / "sites.json").write_text(json.dumps({"seed": 0, "sites": {
        "a": {"profile": {"dxa_bias": 0.05}}, "b": {"profile": {"dxa_bias": -0.04}}}}))
    pd.DataFrame({"true_bmd_device": [1.0, 0.8, 0.9], "dxa_bmd": [1.06, np.nan, 0.95]}).to_csv(tmp_path / "a.csv")
    out = simulated_dxa_bias(tmp_path, ["a", "b", "c"])
    assert set(out) == {"a"}  # b has no per-vertebra truth, c no profile
    assert out["a"] == pytest.approx({"device_bias_rel": 0.05, "device_bias": 0.05 * 0.95, "dxa_minus_truth": 0.055})
    assert simulated_dxa_bias(tmp_path / "nowhere", ["a"]) == {}


def test_onboarding_counts_are_capped_once_each():
    assert labeled_counts([2, 5, 10, 20, 40], 12) == [2, 5, 10, 12]
    assert labeled_counts([40, 20], 12) == [12]
    assert labeled_counts([2, 5], 0) == []
    # a seed with 28 training patients and one with 30: k=40 is the same point ("all") in both
    assert [point_name(k, 28) for k in labeled_counts([20, 40], 28)] == ["k20", "all"]
    assert [point_name(k, 30) for k in labeled_counts([20, 40], 30)] == ["k20", "all"]
    assert point_name(0, 28) == "shared_only" and point_name(28, 28) == "all"


@pytest.mark.parametrize("body, match", [
    ("onboarding: {method: local_only, labeled_patients: [2]}", "not a federated method"),
    ("onboarding: {method: osteofl, labeled_patients: [0, 2]}", "positive integers"),
    ("methods: {x: {engine: magic}}", "unknown engine"),
    ("reference: nobody", "reference 'nobody'"),
    ("select: [osteofl, nobody]", "select: .* must name methods defined"),
    ("select: [fedavg]", "reference 'osteofl' is not one of the methods"),
    ("store: ../elsewhere", "store: '../elsewhere' must name a folder under paths.outputs"),
    ("store: /srv/runs", "store: '/srv/runs' must name a folder under paths.outputs"),
    ("goals: {scenarios: [default], against: fedavg}", r"goals: \['local', 'mae_ratio'"),
    ("goals: {scenarios: default, against: fedavg, local: local_only, mae_ratio: 0.8, bias_ratio: 0.5, "
     "onboarding_patients: 20, onboarding_auc_gap: 0.02}", "scenarios must be a list of scenario names, not 'default'"),
    ("goals: {scenarios: [default], against: fedavg, local: local_only, mae_ratio: eighty, bias_ratio: 0, "
     "onboarding_patients: 2.5, onboarding_auc_gap: 0.02}", "mae_ratio must be a number > 0, not 'eighty'; bias_ratio "
     "must be a number > 0, not 0; onboarding_patients must be a positive integer, not 2.5"),
    ("goals: [strong_shift]", r"goals: \['scenarios'"),
])
def test_a_broken_experiment_is_a_config_error(tmp_path, body, match):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: evidence_quick\nname: bad\n{body}\n")
    with pytest.raises(ConfigError, match=match):
        evidence.load_experiment(str(bad))


def test_a_second_run_on_a_busy_store_is_refused_naming_the_first(tmp_path):
    """Two runs on one store would regenerate its sites under each other: the second stops before any work."""
    root = make_caches(tmp_path, n_patients=24)
    store = root / "outputs" / "tiny"
    held = run_lock.acquire(store, "store tiny", "osteo-evidence")  # as a live first run holds it
    try:
        with pytest.raises(ConfigError, match=f"store tiny is still in use by osteo-evidence pid {os.getpid()}"):
            evidence.run(str(_experiment(tmp_path)), small_overrides(root), log=lambda _: None)
    finally:
        os.close(held)
    assert sorted(p.name for p in store.iterdir()) == ["run.lock"]  # nothing trained, nothing written


def test_an_unknown_experiment_is_a_config_error():
    with pytest.raises(ConfigError, match="no such experiment"):
        evidence.load_experiment("does_not_exist")


def test_base_experiment_keys_are_replaced_not_merged(tmp_path):
    quick, full = evidence.load_experiment("evidence_quick"), evidence.load_experiment("evidence")
    assert list(quick.scenarios) == ["default"] and len(full.scenarios) > 1
    assert quick.reference == full.reference
    # `make evidence` runs the method list; the quick pipeline check runs the whole catalogue
    assert "fedavg_nometa" in quick.methods and "fedavg_nometa" not in full.methods
    assert set(full.methods) < set(quick.methods) and "fedper" in full.methods
    gate = evidence.load_experiment("evidence_gate")
    assert list(gate.methods) == ["osteofl", "fedavg", "osteofl_nometa", "fedavg_nometa"]
    # a file with its own catalogue runs all of it: the base's selection named the base's methods
    own = tmp_path / "own.yaml"
    own.write_text("base: evidence\nname: own\nmethods:\n  osteofl: {engine: federated}\n  hu_rule: {engine: hu_rule}\n")
    assert list(evidence.load_experiment(str(own)).methods) == ["osteofl", "hu_rule"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_loads(name):
    exp = evidence.load_experiment(name)
    assert exp.reference in exp.methods and exp.methods


@pytest.mark.parametrize("name", ["evidence_gate", "evidence_variants", "evidence_ssl", "evidence_refit",
                                  "evidence_seeds5", "evidence_prior"])
def test_follow_up_experiments_reuse_the_benchmarks_sites_and_runs(name):
    """Same store and the same scenario overrides as `make evidence` and at least its seeds, so they train only
    their own methods (and seeds)."""
    full, exp = evidence.load_experiment("evidence"), evidence.load_experiment(name)
    assert exp.store == "evidence" and exp.overrides == full.overrides and set(full.seeds) <= set(exp.seeds)
    assert all(exp.scenarios[sc] == full.scenarios[sc] for sc in exp.scenarios)


def test_cli_prints_one_line_for_a_missing_experiment(capsys):
    assert evidence.main(["--experiment", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such experiment" in err[0]


def test_fedavg_weights_by_pool_size_and_keeps_dtypes():
    from osteofl.simulation.evidence_methods import fedavg

    a = {"w": torch.zeros(2), "n": torch.tensor(0)}
    b = {"w": torch.full((2,), 4.0), "n": torch.tensor(4)}
    out = fedavg([(a, 1), (b, 3)])
    assert np.allclose(out["w"], 3.0) and out["w"].dtype == np.float32
    assert out["n"] == 3 and out["n"].dtype == np.int64
    assert np.allclose(fedavg([(a, 0), (b, 0)])["w"], 2.0)  # no examples anywhere: plain mean


@pytest.mark.slow
def test_jobs_train_every_scenario_and_seed_in_worker_processes(tmp_path):
    """``--jobs 2``: each method of the two seeds trains in one of two spawned processes into the run
    cache, so the report pass trains nothing itself, and the report has both seeds. An experiment that
    names the same store reuses those runs and makes only its own new ones."""
    root = make_caches(tmp_path, n_patients=24)
    exp = tmp_path / "jobs.yaml"
    exp.write_text("base: evidence_quick\nname: jobs\ndata: as_configured\nbootstrap: 20\nonboarding: null\n"
                   "methods:\n  osteofl: {engine: federated}\n  local_only: {engine: local}\n")
    lines: list[str] = []
    result = evidence.run(str(exp), small_overrides(root), log=lines.append, jobs=2)
    assert any("2 scenario x seed data sets, then 4 method runs, in 2 processes" in line for line in lines)
    trained_here = [line for line in lines if line.startswith("[default seed") and "done earlier" not in line]
    assert trained_here == [] and sum("done earlier" in line for line in lines) == 4
    sc = result["scenarios"]["default"]
    assert sc["seeds"] == [0, 1] and set(sc["metrics"]) == {"osteofl", "local_only"}
    assert all(result["seconds"]["default"][seed][m] > 0 for seed in ("0", "1") for m in ("osteofl", "local_only"))
    more = tmp_path / "more.yaml"
    more.write_text("base: evidence_quick\nname: more\nstore: jobs\ndata: as_configured\nbootstrap: 20\n"
                    "onboarding: null\nseeds: [0]\nmethods:\n  osteofl: {engine: federated}\n  hu_rule: {engine: hu_rule}\n")
    lines.clear()
    again = evidence.run(str(more), small_overrides(root), log=lines.append)
    assert [line.split("] ")[1] for line in lines if line.startswith("[default seed")] == [
        "OsteoFL (ours): done earlier (osteofl.npz)", f"L1-HU rule: {again['seconds']['default']['0']['hu_rule']:.1f} s"]
    out = root / "outputs"
    assert (out / "more" / "evidence.md").is_file() and (out / "jobs" / "runs" / "default" / "seed0" / "hu_rule.npz").is_file()
    assert not (out / "more" / "runs").exists()
