"""Statistics of the evidence benchmark: patient-level bootstrap intervals within a seed, their
combination across seeds, and paired differences of two methods on the same patients.

Numpy only (scipy for one t quantile); no torch, no Flower. The unit is the PATIENT: WHO/ISCD classify a
patient from the L1-L4 BMD, and the vertebrae of one patient are not independent, so resampling vertebrae
would understate the uncertainty. Pooled figures resample patients within each site (stratified), so every
bootstrap sample keeps the sites' sizes.

Across seeds (population, split and initialisation drawn anew) the question is how a method does on a NEW
draw, so a seed is a random effect: a seed's estimate theta_s = theta + u_s + e_s, with u_s the seed's own
deviation (variance tau^2) and e_s the test patients' sampling error (variance sigma_s^2, what the
bootstrap within the seed estimates). The sample variance of theta_s across S seeds estimates
tau^2 + sigma^2, i.e. both sources, so mean(theta_s) +- t_{S-1} * sd(theta_s) / sqrt(S) covers the
expected performance 95 % of the time (exactly, for normal theta_s); adding the bootstrap variance on top
would count the patients' noise twice. With 3 seeds sd(theta_s) is noisy, and t_2 = 4.30 is what pays for
that: an earlier floor at the mean bootstrap variance paid for it a second time and made the "95 %"
intervals 96-100 % ones (tests/test_evidence_stats.py simulates the coverage). Seeds that agree exactly
give a zero-width interval. One seed has no spread: its percentile bootstrap interval is reported, and
the result says so (``n_seeds``). Each seed's value and bootstrap SD are kept with the interval
(``Interval.seeds``), so anyone can recompute it from the report.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from osteo_model.errors import OsteoError

OSTEOPOROSIS = 2
BASE_METRICS = ("acc3", "auc", "mae", "r")
"""Patient-level WHO 3-class accuracy, osteoporosis ROC AUC, BMD MAE (g/cm^2), Pearson r of BMD; plus
``bias_<device>``: Bland-Altman bias (predicted - DXA, g/cm^2) per DXA device."""
LEVEL = 0.95
RANGES = {"acc3": (0.0, 1.0), "auc": (0.0, 1.0), "mae": (0.0, np.inf), "r": (-1.0, 1.0)}
"""Where each metric can lie (bias: anywhere): a t-interval over few seeds can reach past it."""


def value_range(name: str, difference: bool = False) -> tuple[float, float]:
    """The possible values of metric ``name``, or of a difference of two of them."""
    lo, hi = RANGES.get(name, (-np.inf, np.inf))
    return (lo - hi, hi - lo) if difference else (lo, hi)


class EvidenceError(OsteoError):
    """Inputs the statistics cannot compare (e.g. two methods judged on different patients)."""

    def __init__(self, reason: str) -> None:
        super().__init__(None, reason)


@dataclass(frozen=True)
class Patients:
    """One method's test predictions at one site (or pooled sites) in one seed, one entry per patient.
    ``score``: higher = more likely osteoporosis (e.g. minus the predicted T-score); ``pred_bmd`` NaN
    for a method that predicts no BMD (the L1-HU rule); ``strata``: the site of each patient (pooled)."""

    device: np.ndarray
    true_bmd: np.ndarray
    pred_bmd: np.ndarray
    true_cat: np.ndarray
    pred_cat: np.ndarray
    score: np.ndarray
    strata: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.true_cat)
        for name in ("device", "true_bmd", "pred_bmd", "pred_cat", "score"):
            if len(getattr(self, name)) != n:
                raise EvidenceError(f"{name} has {len(getattr(self, name))} entries for {n} patients")

    def __len__(self) -> int:
        return len(self.true_cat)

    @property
    def devices(self) -> list[str]:
        return sorted({str(d) for d in self.device})


def concat(parts: Sequence[Patients]) -> Patients:
    """Pool sites: the patients of every part, each part its own bootstrap stratum."""
    fields = ("device", "true_bmd", "pred_bmd", "true_cat", "pred_cat", "score")
    cat = {f: np.concatenate([np.asarray(getattr(p, f)) for p in parts]) for f in fields}
    strata = np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])
    return Patients(**cat, strata=strata)


def metric_names(p: Patients) -> list[str]:
    return [*BASE_METRICS, *(f"bias_{d}" for d in p.devices)]


# --- metrics on index matrices: idx (B, n) picks B resamples of the patients -----------------------------
def _rowmean(values: np.ndarray, idx: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    v = values[idx]
    if weight is None:
        return v.mean(axis=1)
    w = weight[idx].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (v * w).sum(axis=1) / w.sum(axis=1)


def _pearson(a: np.ndarray, b: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per resample; NaN below 3 patients (two points always lie on a line), as metrics.pearson_r."""
    if idx.shape[1] < 3:
        return np.full(len(idx), np.nan)
    x, y = a[idx], b[idx]
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x * y).sum(1) / np.sqrt((x * x).sum(1) * (y * y).sum(1))
    return np.where(np.isfinite(r), r, np.nan)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    first = np.r_[True, sx[1:] != sx[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + ends + 1) / 2.0)[group]  # 1-based mean rank of each tie group
    return ranks


def _auc(positive: np.ndarray, score: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Mann-Whitney ROC AUC (ties count half) per resample over the patients with a score; NaN when one
    class is missing."""
    out = np.full(len(idx), np.nan)
    scored = np.isfinite(score)
    for b, rows in enumerate(idx):
        rows = rows[scored[rows]]
        y, s = positive[rows], score[rows]
        n1 = int(y.sum())
        n0 = len(y) - n1
        if n1 and n0:
            out[b] = (_average_ranks(s)[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    return out


def _metric_fns(p: Patients) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    err = np.asarray(p.pred_bmd, float) - np.asarray(p.true_bmd, float)
    correct = (np.asarray(p.pred_cat) == np.asarray(p.true_cat)).astype(float)
    positive = np.asarray(p.true_cat) == OSTEOPOROSIS
    score = np.asarray(p.score, float)
    device = np.asarray(p.device).astype(str)
    fns: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "acc3": lambda idx: _rowmean(correct, idx),
        "auc": lambda idx: _auc(positive, score, idx),
        "mae": lambda idx: _rowmean(np.abs(err), idx),
        "r": lambda idx: _pearson(np.asarray(p.pred_bmd, float), np.asarray(p.true_bmd, float), idx),
    }
    for dev in p.devices:
        fns[f"bias_{dev}"] = lambda idx, sel=(device == dev): _rowmean(err, idx, sel)
    return fns


def point(p: Patients) -> dict[str, float]:
    """Every metric on all patients (no resampling)."""
    full = np.arange(len(p))[None, :]
    return {k: float(fn(full)[0]) for k, fn in _metric_fns(p).items()}


def resample_index(n: int, n_boot: int, rng: np.random.Generator, strata: np.ndarray | None = None) -> np.ndarray:
    """(n_boot, n) patient indices drawn with replacement, within each stratum when ``strata`` is given."""
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    cols = []
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        cols.append(members[rng.integers(0, len(members), size=(n_boot, len(members)))])
    return np.concatenate(cols, axis=1)


@dataclass(frozen=True)
class Estimate:
    """A metric (or a difference of metrics) in one seed: the value on all patients, the bootstrap SD and
    the percentile interval of the patient bootstrap."""

    point: float
    sd: float
    lo: float
    hi: float


def _estimate(full: float, draws: np.ndarray) -> Estimate:
    draws = draws[np.isfinite(draws)]
    if not np.isfinite(full) or len(draws) < 2:
        return Estimate(float(full), float("nan"), float("nan"), float("nan"))
    alpha = (1 - LEVEL) / 2
    lo, hi = np.quantile(draws, [alpha, 1 - alpha])
    # the percentile interval of a skewed statistic need not hold the full-sample value; widen to it
    return Estimate(float(full), float(draws.std(ddof=1)), float(min(lo, full)), float(max(hi, full)))


def within_seed(p: Patients, n_boot: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """Patient bootstrap of every metric of one method in one seed."""
    idx = resample_index(len(p), n_boot, np.random.default_rng(seed), p.strata)
    full = point(p)
    return {k: _estimate(full[k], fn(idx)) for k, fn in _metric_fns(p).items()}


def _check_paired(a: Patients, b: Patients) -> None:
    """Paired comparison needs the same patients in the same order: the truth must agree exactly."""
    if len(a) != len(b):
        raise EvidenceError(f"paired comparison of {len(a)} with {len(b)} patients: not the same patients")
    same = np.array_equal(np.asarray(a.true_cat), np.asarray(b.true_cat)) and np.allclose(
        np.asarray(a.true_bmd, float), np.asarray(b.true_bmd, float), equal_nan=True)
    if not same or list(np.asarray(a.device).astype(str)) != list(np.asarray(b.device).astype(str)):
        raise EvidenceError("paired comparison: the two methods' patients differ (truth or device disagrees)")


def paired(a: Patients, b: Patients, n_boot: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """Method A minus method B on the SAME patients: each bootstrap sample draws patients once and judges
    both methods on them, so what the patients share (hard cases, the site's prevalence) cancels."""
    _check_paired(a, b)
    # the AUC of each on the patients BOTH score: one method's unscored patient must not leave the other's AUC
    # judged on more patients than its own
    both = np.isfinite(np.asarray(a.score, float)) & np.isfinite(np.asarray(b.score, float))
    a, b = (replace(p, score=np.where(both, np.asarray(p.score, float), np.nan)) for p in (a, b))
    idx = resample_index(len(a), n_boot, np.random.default_rng(seed), a.strata)
    fa, fb, pa, pb = _metric_fns(a), _metric_fns(b), point(a), point(b)
    return {k: _estimate(pa[k] - pb[k], fa[k](idx) - fb[k](idx)) for k in fa if k in fb}


@dataclass(frozen=True)
class Interval:
    """A metric over seeds: the mean of the seeds' values and its 95 % interval (module docstring)."""

    point: float
    lo: float
    hi: float
    n_seeds: int
    seeds: tuple[tuple[float, float], ...] = ()
    """(value, bootstrap SD) of each seed that entered, in order."""

    def as_dict(self) -> dict[str, float | int | None | list]:
        def clean(v: float) -> float | None:
            return float(v) if np.isfinite(v) else None

        return {"point": clean(self.point), "lo": clean(self.lo), "hi": clean(self.hi), "n_seeds": self.n_seeds,
                "per_seed": [{"point": clean(v), "sd": clean(sd)} for v, sd in self.seeds]}


def combine(estimates: Sequence[Estimate], bounds: tuple[float, float] = (-np.inf, np.inf)) -> Interval:
    """Mean over seeds with its t-interval across seeds, which holds the seed-to-seed spread and the
    patients' sampling noise alike (module docstring), cut to ``bounds`` (value_range: with 2 seeds t is
    12.7 and an accuracy's interval would pass 1)."""
    ok = [e for e in estimates if np.isfinite(e.point)]
    seeds = tuple((float(e.point), float(e.sd)) for e in ok)
    if not ok:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    if len(ok) == 1:
        return Interval(ok[0].point, ok[0].lo, ok[0].hi, 1, seeds)
    values = np.array([e.point for e in ok])
    half = float(stats.t.ppf(0.5 + LEVEL / 2, len(ok) - 1)) * np.sqrt(float(values.var(ddof=1)) / len(ok))
    mean = float(values.mean())
    return Interval(mean, max(mean - half, bounds[0]), min(mean + half, bounds[1]), len(ok), seeds)
