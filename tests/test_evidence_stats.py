"""Statistics of the evidence benchmark (osteo_model.evidence) against answers known in advance."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from osteo_model import evidence as ev


def patients(n: int, seed: int = 0, noise: float = 0.05, devices: tuple[str, ...] = ("hologic",)) -> ev.Patients:
    rng = np.random.default_rng(seed)
    true = rng.normal(0.9, 0.15, n)
    pred = true + rng.normal(0, noise, n)
    cat = np.digitize(-true, [-0.85, -0.7])  # 0 normal, 1 osteopenia, 2 osteoporosis
    pcat = np.digitize(-pred, [-0.85, -0.7])
    return ev.Patients(device=np.resize(np.array(devices), n), true_bmd=true, pred_bmd=pred, true_cat=cat,
                       pred_cat=pcat, score=-pred)


def test_point_metrics_match_reference_implementations():
    p = patients(80, noise=0.08)
    m = ev.point(p)
    assert m["mae"] == pytest.approx(np.mean(np.abs(p.pred_bmd - p.true_bmd)))
    assert m["r"] == pytest.approx(np.corrcoef(p.pred_bmd, p.true_bmd)[0, 1])
    assert m["acc3"] == pytest.approx(np.mean(p.pred_cat == p.true_cat))
    assert m["auc"] == pytest.approx(roc_auc_score(p.true_cat == 2, p.score))
    assert m["bias_hologic"] == pytest.approx(np.mean(p.pred_bmd - p.true_bmd))


def test_auc_counts_ties_half():
    p = dataclasses.replace(patients(40), score=np.round(patients(40).score, 1))  # many ties
    assert ev.point(p)["auc"] == pytest.approx(roc_auc_score(p.true_cat == 2, p.score))


def test_identical_methods_differ_by_exactly_zero():
    p = patients(50)
    d = ev.paired(p, p, n_boot=200)
    for name in ev.metric_names(p):
        assert d[name].point == 0 and d[name].lo <= 0 <= d[name].hi
    assert d["mae"].lo == d["mae"].hi == 0


def test_constant_shift_is_the_bias_difference_on_every_draw():
    a = patients(60)
    b = dataclasses.replace(a, pred_bmd=a.pred_bmd - 0.03)
    d = ev.paired(a, b, n_boot=300)["bias_hologic"]
    assert d.point == pytest.approx(0.03) and d.lo == pytest.approx(0.03) and d.hi == pytest.approx(0.03)


def test_shift_at_one_device_leaves_the_other_devices_bias_alone():
    a = patients(60, devices=("hologic", "ge_lunar"))
    shifted = np.where(a.device == "ge_lunar", a.pred_bmd + 0.05, a.pred_bmd)
    d = ev.paired(dataclasses.replace(a, pred_bmd=shifted), a, n_boot=200)
    assert d["bias_ge_lunar"].point == pytest.approx(0.05)
    assert d["bias_hologic"].point == pytest.approx(0.0)


def test_intervals_shrink_with_more_patients():
    small = ev.within_seed(patients(30, seed=1), n_boot=400)
    large = ev.within_seed(patients(600, seed=1), n_boot=400)
    for name in ("mae", "acc3", "r", "bias_hologic"):
        assert large[name].hi - large[name].lo < 0.5 * (small[name].hi - small[name].lo)
        assert small[name].lo <= small[name].point <= small[name].hi


def test_paired_interval_is_narrower_than_each_methods_own():
    """A small improvement on the same patients is detectable although the two intervals overlap."""
    a = patients(80, noise=0.06, seed=3)
    b = dataclasses.replace(a, pred_bmd=a.true_bmd + (a.pred_bmd - a.true_bmd) * 1.1)
    d = ev.paired(a, b, n_boot=400)["mae"]
    own = ev.within_seed(a, n_boot=400)["mae"]
    assert d.hi < 0 and (d.hi - d.lo) < 0.5 * (own.hi - own.lo)


def test_different_patients_are_refused():
    a, b = patients(40, seed=0), patients(40, seed=1)
    with pytest.raises(ev.EvidenceError, match="patients differ"):
        ev.paired(a, b)
    with pytest.raises(ev.EvidenceError, match="not the same patients"):
        ev.paired(a, patients(41))


def test_mismatched_lengths_are_refused():
    p = patients(10)
    with pytest.raises(ev.EvidenceError, match="pred_bmd"):
        dataclasses.replace(p, pred_bmd=p.pred_bmd[:5])


def test_method_without_bmd_gives_nan_bmd_metrics_but_valid_classification():
    p = dataclasses.replace(patients(40), pred_bmd=np.full(40, np.nan))
    est = ev.within_seed(p, n_boot=100)
    assert np.isnan(est["mae"].point) and np.isnan(est["mae"].lo)
    assert 0 <= est["acc3"].lo <= est["acc3"].point <= est["acc3"].hi <= 1


def test_stratified_resampling_keeps_every_sites_size():
    strata = np.repeat([0, 1, 2], [5, 20, 3])
    idx = ev.resample_index(len(strata), 50, np.random.default_rng(0), strata)
    assert idx.shape == (50, 28)
    for s, size in ((0, 5), (1, 20), (2, 3)):
        assert ((strata[idx] == s).sum(axis=1) == size).all()


def test_pooling_concatenates_sites_as_strata():
    pooled = ev.concat([patients(10, seed=0), patients(7, seed=1)])
    assert len(pooled) == 17 and list(np.bincount(pooled.strata)) == [10, 7]


def test_combine_is_a_t_interval_across_seeds():
    seeds = [ev.Estimate(v, 1e-6, v - 0.1, v + 0.1) for v in (1.0, 2.0, 3.0)]
    iv = ev.combine(seeds)
    half = stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)
    assert iv.point == pytest.approx(2.0) and iv.n_seeds == 3
    assert iv.lo == pytest.approx(2.0 - half) and iv.hi == pytest.approx(2.0 + half)


@pytest.mark.parametrize("tau", [0.0, 1.0, 4.0])
def test_combined_interval_covers_95_percent_under_random_seed_effects(tau):
    """3 seeds, each theta + u_s (SD tau x the patients' SE) + its test patients' error (SE 1, which the
    bootstrap SD reports): the interval holds theta 95 % of the time, whatever tau. Flooring the spread at
    the bootstrap variance (the former rule) covered 100 % at tau 0: "95 %" intervals that were 99 % ones."""
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(4000):
        values = rng.normal(0.0, tau, 3) + rng.normal(0.0, 1.0, 3)
        iv = ev.combine([ev.Estimate(v, 1.0, v - 1.96, v + 1.96) for v in values])
        hits += iv.lo <= 0.0 <= iv.hi
    assert 0.935 <= hits / 4000 <= 0.965


def test_combined_interval_keeps_each_seeds_value_and_bootstrap_sd():
    iv = ev.combine([ev.Estimate(0.5, 0.1, 0.3, 0.7), ev.Estimate(*(float("nan"),) * 4), ev.Estimate(0.7, 0.2, 0.3, 1.1)])
    assert iv.n_seeds == 2 and iv.as_dict()["per_seed"] == [{"point": 0.5, "sd": 0.1}, {"point": 0.7, "sd": 0.2}]


def test_combine_of_one_seed_is_its_bootstrap_interval_and_skips_missing_seeds():
    one = ev.Estimate(0.5, 0.1, 0.3, 0.7)
    iv = ev.combine([one, ev.Estimate(float("nan"), float("nan"), float("nan"), float("nan"))])
    assert (iv.point, iv.lo, iv.hi, iv.n_seeds) == (0.5, 0.3, 0.7, 1)
    assert ev.combine([]).n_seeds == 0 and ev.combine([]).as_dict()["point"] is None


def test_combined_interval_stays_within_the_metrics_range():
    iv = ev.combine([ev.Estimate(v, 0.05, v - 0.1, v + 0.1) for v in (0.9, 0.99)], ev.value_range("auc"))
    assert iv.hi == 1.0 and iv.lo >= 0.0 and iv.lo < iv.point
    assert ev.value_range("r", difference=True) == (-2.0, 2.0)
    assert ev.value_range("bias_hologic") == (-np.inf, np.inf)


def test_paired_auc_is_judged_on_the_patients_both_methods_score():
    """A patient one method cannot score (no HU value) leaves the other's AUC too: identical predictions then
    differ by exactly zero, not by what that one patient does to one side only."""
    a = patients(60, seed=3, noise=0.15)
    b = dataclasses.replace(a, score=np.where(np.arange(60) == int(np.argmax(a.true_cat == 2)), np.nan, a.score))
    assert ev.point(a)["auc"] != ev.point(b)["auc"]
    diff = ev.paired(a, b, n_boot=200)["auc"]
    assert diff.point == 0.0 and diff.sd == 0.0


def test_pearson_needs_three_patients_and_bland_altman_two():
    from osteo_model import metrics

    two = patients(2)
    assert np.isnan(ev.point(two)["r"]) and np.isnan(metrics.pearson_r([1.0, 2.0], [2.0, 1.0]))
    bias, lo, hi = metrics.bland_altman([1.1], [1.0])
    assert bias == pytest.approx(0.1) and np.isnan(lo) and np.isnan(hi)
