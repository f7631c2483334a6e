"""The benchmark's bone oracle: the synthetic truth's bone times one DXA factor per site, fitted on the
site's training and validation vertebrae only, judged on its test patients; a clear error where there is
no truth to read."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cache_factory import make_site_cache
from federation_helpers import small_overrides
from osteo_model.config import compose
from osteo_model.dataset import load_site_data
from osteo_model.errors import ConfigError
from osteofl.simulation.evidence_methods import bone_oracle

FACTOR = 1.08


def _site(tmp_path, test_shift: float | None = 0.0, drop: int = 0):
    """A fake site whose truth is its DXA reading / FACTOR outside the test split; the test vertebrae's
    truth is off by ``test_shift``, so what the oracle predicts there shows where it came from. No truth
    file with ``test_shift=None``; ``drop`` leaves the first vertebrae out of it."""
    cfg = compose(small_overrides(tmp_path))
    data = load_site_data(make_site_cache(tmp_path / "data" / "cache" / "site_a", n_patients=30, size=8), cfg)
    if test_shift is not None:
        table = data.cache.table
        true = np.nan_to_num(table["bmd"].to_numpy(float), nan=0.9) / FACTOR
        true[data.splits["test"]] += test_shift
        truth_dir = tmp_path / "data" / "ground_truth"
        truth_dir.mkdir(parents=True)
        pd.DataFrame({"study_id": table["study_id"], "level": table["level"], "true_bmd_device": true}).iloc[drop:].to_csv(
            truth_dir / "site_a.csv", index=False)
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


def test_a_site_without_truth_is_a_config_error_naming_the_file(tmp_path):
    cfg, data = _site(tmp_path, test_shift=None)
    with pytest.raises(ConfigError, match=r"site_a\.csv.*no synthetic truth"):
        bone_oracle(cfg, {"site_a": data}, "cpu")


def test_truth_missing_some_vertebrae_is_a_config_error_saying_how_many(tmp_path):
    cfg, data = _site(tmp_path, drop=3)
    with pytest.raises(ConfigError, match=r"site_a\.csv.*3 of the site's 120 vertebrae have no true_bmd_device"):
        bone_oracle(cfg, {"site_a": data}, "cpu")
