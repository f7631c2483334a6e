"""The benchmark's bone oracle: the synthetic truth's bone times one DXA factor per site, fitted on the
site's training and validation vertebrae only, judged on its test patients; a clear error where there is
no truth to read."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from cache_factory import make_site_cache
from federation_helpers import small_overrides
from osteo_model.config import compose
from osteo_model.dataset import load_site_data
from osteo_model.errors import ConfigError
from osteofl.simulation import evidence
from osteofl.simulation.evidence_methods import bone_oracle

FACTOR = 1.08


def _age(table: pd.DataFrame) -> np.ndarray:
    """Each patient's age: 50-85, drawn from the patient id."""
    codes = pd.factorize(table["patient_id"].astype(str))[0]
    return 50.0 + (codes * 7) % 36


def _site(tmp_path, test_shift: float | None = 0.0, drop: int = 0, per_year: float = 0.0):
    """A fake site whose truth is its DXA reading / (FACTOR + per_year x (age - 60)) outside the test
    split; the test vertebrae's truth is off by ``test_shift``, so what the oracle predicts there shows
    where it came from. No truth file with ``test_shift=None``; ``drop`` leaves the first vertebrae out."""
    cfg = compose(small_overrides(tmp_path))
    data = load_site_data(make_site_cache(tmp_path / "data" / "cache" / "site_a", n_patients=30, size=8), cfg)
    if test_shift is not None:
        table = data.cache.table
        age = _age(table)
        true = np.nan_to_num(table["bmd"].to_numpy(float), nan=0.9) / (FACTOR + per_year * (age - 60))
        true[data.splits["test"]] += test_shift
        truth_dir = tmp_path / "data" / "ground_truth"
        truth_dir.mkdir(parents=True)
        pd.DataFrame({"study_id": table["study_id"], "level": table["level"], "true_bmd_device": true,
                      "age": age}).iloc[drop:].to_csv(truth_dir / "site_a.csv", index=False)
    return cfg, data


def test_the_oracle_learns_the_sites_factor_outside_the_test_split_and_reads_the_test_bone(tmp_path):
    cfg, data = _site(tmp_path)
    exact = bone_oracle(cfg, {"site_a": data}, "cpu").predictions["site_a"]
    ok = np.isfinite(exact.true_bmd)
    assert ok.sum() >= 5 and np.allclose(exact.pred_bmd[ok], exact.true_bmd[ok])  # DXA = FACTOR x truth: MAE 0

    shift = 0.05  # the test split's truth alone moves: the factor (fitted elsewhere) stays, predictions follow it
    cfg, data = _site(tmp_path / "shifted", shift)
    moved = bone_oracle(cfg, {"site_a": data}, "cpu").predictions["site_a"]
    assert np.allclose(moved.pred_bmd[ok] - exact.pred_bmd[ok], FACTOR * shift)


def test_the_oracles_factor_follows_age(tmp_path):
    """DXA reads more over the truth in older patients (degeneration, aortic calcification): the oracle's
    factor is a line in age, so it stays exact where one constant factor could not."""
    cfg, data = _site(tmp_path, per_year=0.004)
    got = bone_oracle(cfg, {"site_a": data}, "cpu").predictions["site_a"]
    ok = np.isfinite(got.true_bmd)
    assert ok.sum() >= 5 and np.allclose(got.pred_bmd[ok], got.true_bmd[ok])


def test_a_site_without_truth_is_a_config_error_naming_the_file(tmp_path):
    cfg, data = _site(tmp_path, test_shift=None)
    with pytest.raises(ConfigError, match=r"site_a\.csv.*no synthetic truth"):
        bone_oracle(cfg, {"site_a": data}, "cpu")


def test_truth_without_age_is_a_config_error_naming_the_file(tmp_path):
    cfg, data = _site(tmp_path)
    truth = tmp_path / "data" / "ground_truth" / "site_a.csv"
    pd.read_csv(truth).drop(columns="age").to_csv(truth, index=False)
    with pytest.raises(ConfigError, match=r"site_a\.csv.*no column age"):
        bone_oracle(cfg, {"site_a": data}, "cpu")


def test_truth_missing_some_vertebrae_is_a_config_error_saying_how_many(tmp_path):
    cfg, data = _site(tmp_path, drop=3)
    with pytest.raises(ConfigError, match=r"site_a\.csv.*3 of the site's 120 vertebrae have no true_bmd_device or age"):
        bone_oracle(cfg, {"site_a": data}, "cpu")


def test_a_site_without_dxa_outside_its_test_split_is_a_config_error_naming_it(tmp_path):
    cfg, data = _site(tmp_path)
    table = data.cache.table
    fit = np.concatenate([data.splits["train"], data.splits["val"]])
    table.loc[table.index[fit], "bmd"] = np.nan  # the factor would be the median of nothing
    with pytest.raises(ConfigError, match=r"cache/site_a.*no training or validation vertebra has a DXA BMD"):
        bone_oracle(cfg, {"site_a": data}, "cpu")


def test_the_oracles_cached_run_follows_the_truth_it_read(tmp_path):
    """``paths`` is not part of a run's key, so the truth's content is: another truth for the same caches
    is read again, never answered from the run cache."""
    cfg, data = _site(tmp_path)
    plan = SimpleNamespace(exp=OmegaConf.create({"methods": {"bone_oracle": {"engine": "bone_oracle"}}}),
                           store=tmp_path / "store")
    unit = evidence.UnitData([], cfg, {"site_a": data}, evidence._data_key({"site_a": data}))
    said: list[str] = []

    def run() -> np.ndarray:
        result = {"seconds": {}, "round_seconds": {}}
        return evidence._method_run(plan, "s", 0, "bone_oracle", unit, cfg, result, said.append).predictions["site_a"].pred_bmd

    first = run()
    assert np.array_equal(run(), first, equal_nan=True) and "done earlier" in said[-1]
    truth = tmp_path / "data" / "ground_truth" / "site_a.csv"
    frame = pd.read_csv(truth)
    frame.loc[frame.index[data.splits["test"]], "true_bmd_device"] += 0.05
    frame.to_csv(truth, index=False)
    moved = run()
    assert "done earlier" not in said[-1]
    ok = np.isfinite(first)
    assert ok.sum() >= 5 and np.allclose(moved[ok] - first[ok], FACTOR * 0.05)
