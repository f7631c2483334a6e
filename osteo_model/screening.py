"""Screening values of CT studies from a trained model: the numbers of a hospital's screening report.

Per level L1-L4: trabecular HU (mean, median; trabecular core at CT resolution), predicted sBMD and device
BMD, T-score on the site's DXA reference, WHO category, P(osteoporosis); an excluded level says why.
Per patient: ISCD 2019 (mean BMD of at least two evaluable L1-L4 levels, else "not evaluable" and why),
with Pickhardt's L1-HU rule beside it. An interval from the residuals of the site's own validation
patients (predicted minus DXA) says how far one number can be trusted, and out-of-distribution flags say
when a CT looks unlike the data the model learned from. Predictions come from ``training.predict`` on
cache rows (or on rows prepared the same way from a new CT), so they are exactly what osteo-eval sees.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from osteo_model import bmd as bmdlib
from osteo_model.baselines import hu_category
from osteo_model.cache import INDEX_COLUMNS, SiteCache
from osteo_model.constants import (
    ISCD_ADJACENT_T_DIFFERENCE, LEVELS, MIN_LEVELS_FOR_DIAGNOSIS, PICKHARDT_L1_HU_SENSITIVE, PICKHARDT_L1_HU_SPECIFIC,
    TOTALSEG_CONTRAST_OFFSET_HU, TOTALSEG_OSTEOPOROSIS_HU, WHO_CATEGORY_MIN_AGE,
)
from osteo_model.checkpoints import SPLIT_PIN, VAL_PATIENTS
from osteo_model.dataset import SiteData, patients_sha256
from osteo_model.metrics import OSTEOPOROSIS, patient_level
from osteo_model.model import OsteoNet, feature_stats
from osteo_model.quarantine import LEVEL_EXCLUDED, QUARANTINED
from osteo_model.training import predict

RESEARCH_USE = "Research use only: not a medical device, not for diagnosis or treatment decisions."
SCREENING_ESTIMATE = "CT estimate of the DXA result (screening): confirm with DXA"
"""The T-score and category are a CT model's estimate of what DXA would read, never a DXA diagnosis."""
HU_RULE_NAMES = (f"osteoporosis unlikely (L1 > {PICKHARDT_L1_HU_SENSITIVE:g} HU)",
                 f"osteoporosis not excluded (L1 <= {PICKHARDT_L1_HU_SENSITIVE:g} HU: 90 % sensitive)",
                 f"osteoporosis likely (L1 <= {PICKHARDT_L1_HU_SPECIFIC:g} HU: > 90 % specific)")
"""Pickhardt 2013 thresholds (osteo_model.baselines.hu_category) as a reader sees them: both are thresholds for
osteoporosis (clinical.md), so the middle band says only that osteoporosis is not excluded."""
TOTALSEG_PHASE_NOTE = ("threshold for non-contrast CT; contrast raises it by "
                       + ", ".join(f"{hu:g} HU ({phase})" for phase, hu in TOTALSEG_CONTRAST_OFFSET_HU.items()))
NO_WHO_CATEGORY = "no WHO category (age < 50: Z-score)"


@dataclass
class StudyInput:
    """One study's evaluable rows in a cache (the site's, or an in-memory one built from a new CT)."""

    study_id: str
    cache: SiteCache
    rows: np.ndarray
    excluded: dict[str, str]
    scanner: str = ""
    source: str = "prepared"
    ct: Path | None = None
    labels: Path | None = None
    problem: str = ""          # why the whole study could not be read or prepared (then no rows)
    inputs_sha256: str = ""    # digest of the CT and label files osteo-prepare read ("" if not recorded)


@dataclass
class LevelResult:
    level: str
    evaluable: bool
    reason: str = ""           # why a level is not evaluable
    hu_mean: float = float("nan")
    hu_median: float = float("nan")
    sbmd: float = float("nan")
    bmd: float = float("nan")
    t_score: float = float("nan")
    t_low: float = float("nan")
    t_high: float = float("nan")
    category: str = ""
    p_osteoporosis: float = float("nan")
    flags: list[str] = field(default_factory=list)
    iscd_outlier: bool = False  # flagged by flag_outlier_levels: the reader may exclude it


@dataclass
class PatientResult:
    evaluable: bool
    levels_used: list[str]
    reason: str = ""
    bmd: float = float("nan")
    t_score: float = float("nan")
    t_low: float = float("nan")
    t_high: float = float("nan")
    category: str = ""
    interval_note: str = ""
    t_note: str = ""            # which reference the T-score is on, and who the WHO categories are for
    without_flagged: str = ""   # the patient value without the levels ISCD flags, for the reader who excludes them
    l1_hu: float = float("nan")
    l1_hu_rule: str = ""       # Pickhardt 2013 call on L1 mean HU
    l1_totalseg_flag: str = ""  # TotalSegmentator's < 90.25 HU median rule on L1


@dataclass
class StudyReport:
    study_id: str
    source: str
    scanner: str
    manufacturer: str
    levels: list[LevelResult]
    patient: PatientResult
    flags: list[str]
    image: str = ""            # PNG file name in the report folder
    image_note: str = ""       # why there is no image, or why it may not show what the numbers came from
    ct: str = ""               # a new CT's files as given (its id comes from the file name alone)
    labels: str = ""


@dataclass(frozen=True)
class Reference:
    """What the site knows about the data the model learned from, and how wrong it was on validation.

    ``level_residuals`` / ``patient_residuals``: predicted minus DXA device BMD on the site's validation
    vertebrae / patients (empty when the site has none); ``scanners``, ``hu_range`` and ``features``: the
    site's training pool (all rows but held-out patients), what the site's part of the model learned from."""

    level_residuals: np.ndarray
    patient_residuals: np.ndarray
    n_val_patients: int
    scanners: frozenset[str]
    hu_range: tuple[float, float] | None
    features: tuple[np.ndarray, np.ndarray] | None  # mean, SD of the radiomic features of the training pool
    coverage: float
    min_patients: int
    unfit: str = ""  # why the validation residuals cannot give an interval

    def interval(self, bmd: float, patient: bool) -> tuple[float, float] | None:
        """Central ``coverage`` interval of the true device BMD given a prediction; None when the site has
        fewer validation patients than ``min_patients`` or its residuals are unfit."""
        res = self.patient_residuals if patient else self.level_residuals
        if self.unfit or self.n_val_patients < self.min_patients or not len(res) or not np.isfinite(bmd):
            return None
        alpha = (1.0 - self.coverage) / 2
        lo, hi = np.quantile(res, [alpha, 1 - alpha])
        return bmd - float(hi), bmd - float(lo)

    def interval_note(self) -> str:
        if self.unfit:
            return f"no interval: {self.unfit}"
        if self.n_val_patients == 0:
            return "no interval: no validation patients with DXA at this site"
        if self.n_val_patients < self.min_patients:
            return f"no interval: only {self.n_val_patients} validation patient(s) with DXA (need {self.min_patients})"
        return (f"{self.coverage:.0%} interval from predicted-minus-DXA residuals of {self.n_val_patients} "
                f"validation patients of this site")


def _trained_on_validation(card: Mapping, data: SiteData) -> bool:
    """Whether some of the site's validation patients may be patients the model (its ``card``) trained on:
    not where both follow the same pinned split (a pinned patient never changes split; new ones were never
    trained on), else where the validation patients are not those held out when the model trained (a
    changed split, or a re-prepared cache that reshuffled an unpinned one). Models whose card records
    neither (federated checkpoints, central ones of the earlier format) cannot tell."""
    if card.get(SPLIT_PIN) is not None and card.get(SPLIT_PIN) == data.split_id:
        return False
    held_out = card.get(VAL_PATIENTS)
    if isinstance(held_out, Mapping):  # a central checkpoint: each training site's
        held_out = held_out.get(data.site)
    return held_out is not None and held_out != patients_sha256(data, "val")


def site_reference(model: OsteoNet, data: SiteData | None, predict_cfg, device: str,
                   card: Mapping = MappingProxyType({})) -> Reference:
    """Residuals on the site's validation split and the site's training-pool scanners and HU range. Where
    the model's ``card`` says it may have trained on some of the validation patients, their residuals
    would give too narrow an interval: none is given, and the note says why."""
    coverage, min_patients = float(predict_cfg.interval_coverage), int(predict_cfg.min_val_patients)
    if data is None:
        return Reference(np.zeros(0), np.zeros(0), 0, frozenset(), None, None, coverage, min_patients)
    unfit = ("this site's validation patients are not those held out when the model trained (its split or "
             "prepared cache changed since): some may have been trained on" if _trained_on_validation(card, data) else "")
    table = data.cache.table
    pool = table.iloc[data.splits["unlabeled"]]
    hu = pool["hu_mean"].to_numpy(float)
    hu = hu[np.isfinite(hu)]
    rows = data.splits["val"]
    level_res, patient_res, n_val = np.zeros(0), np.zeros(0), 0
    if len(rows) and not unfit:  # unfit residuals are never used
        val = table.iloc[rows]
        pred = predict(model, data, rows, device, batch_size=int(predict_cfg.batch_size))
        level_res = pred["bmd"] - val["bmd"].to_numpy(float)
        pat = patient_level(pred["bmd"], val)
        patient_res = (pat["pred"] - pat["true"]).to_numpy(float)
        n_val = int(val["patient_id"].nunique())
    scanners = frozenset(s for s in pool["scanner"].fillna("").astype(str) if s)
    hu_range = (float(hu.min()), float(hu.max())) if len(hu) else None
    features = feature_stats(np.asarray(data.cache.features)[data.splits["unlabeled"]]) if len(pool) else None
    return Reference(level_res, patient_res, n_val, scanners, hu_range, features, coverage, min_patients, unfit)


def quarantine_reasons(cache_dir: Path) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """From osteo-prepare's quarantine.csv: per study, level -> why it was excluded; and per quarantined
    study, why it was left out entirely."""
    path = Path(cache_dir) / "quarantine.csv"
    levels: dict[str, dict[str, str]] = defaultdict(dict)
    studies: dict[str, str] = {}
    if not path.is_file():
        return levels, studies
    q = pd.read_csv(path, dtype=str, keep_default_na=False)
    for r in q.itertuples():
        if r.action == LEVEL_EXCLUDED and r.level:
            levels[r.case][r.level] = r.reason
        elif r.action == QUARANTINED:
            studies[r.case] = r.reason
    return levels, studies


def prepared_studies(data: SiteData, study_table: pd.DataFrame | None,
                     study_ids: Sequence[str] | None = None) -> list[StudyInput]:
    """The site's prepared studies (all, or ``study_ids`` in that order); a requested study that is not in
    the cache is reported with osteo-prepare's reason. ``study_table``: the site's studies.csv rows
    (study_id and the resolved ct, labels paths), for the image; None when it cannot be read. A study
    quarantined as a whole keeps osteo-prepare's reason for each level it excluded."""
    table = data.cache.table
    by_study = {s: np.asarray(idx) for s, idx in table.groupby("study_id", sort=False).indices.items()}
    level_reasons, study_reasons = quarantine_reasons(data.cache.path)
    files = {} if study_table is None else {r.study_id: (Path(r.ct), Path(r.labels)) for r in study_table.itertuples()}
    out = []
    for sid in list(study_ids) if study_ids else list(by_study):
        rows = by_study.get(sid, np.zeros(0, dtype=int))
        ct, labels = files.get(sid, (None, None))
        present = set(table["level"].iloc[rows])
        problem = "" if len(rows) else study_reasons.get(sid, "study not prepared: run osteo-prepare for this site")
        excluded = {lv: level_reasons.get(sid, {}).get(lv, problem or "not in the prepared cache") for lv in LEVELS
                    if lv not in present}
        first = table.iloc[rows[0]] if len(rows) else pd.Series(dtype=object)
        scanner, inputs = (_text(first.get(c)) for c in ("scanner", "inputs_sha256"))  # no digest in older caches
        out.append(StudyInput(sid, data.cache, rows, excluded, scanner, "prepared", ct, labels, problem, inputs))
    return out


def _text(value: object) -> str:
    return str(value) if pd.notna(value) else ""


def _feature_flags(z: np.ndarray, names: Sequence[str], predict_cfg) -> list[str]:
    """Flag a vertebra whose texture features sit far outside the training distribution."""
    if not np.isfinite(z).all():
        return ["texture features not computable"]
    extreme = np.abs(z) > float(predict_cfg.ood_feature_z)
    if extreme.mean() < float(predict_cfg.ood_feature_fraction):
        return []
    worst = names[int(np.argmax(np.abs(z)))]
    return [f"texture unlike training: {int(extreme.sum())}/{len(z)} features beyond "
            f"{float(predict_cfg.ood_feature_z):g} SD (e.g. {worst})"]


def _level_flags(row: pd.Series, features: np.ndarray, names: Sequence[str], ref: Reference, predict_cfg) -> list[str]:
    flags = []
    if ref.features is not None:
        flags += _feature_flags((np.asarray(features, np.float64) - ref.features[0]) / ref.features[1], names, predict_cfg)
    if ref.hu_range is not None and not ref.hu_range[0] <= row["hu_mean"] <= ref.hu_range[1]:
        flags.append(f"HU {row['hu_mean']:.0f} outside the site's training range "
                     f"{ref.hu_range[0]:.0f}..{ref.hu_range[1]:.0f}")
    return flags


def _t_scores(bmd: float, interval: tuple[float, float] | None, levels: Sequence[str], manufacturer: str,
              sex: str) -> tuple[float, float, float]:
    """T-score of a BMD over ``levels`` and of its interval's ends, on those levels' reference."""
    def t(value: float) -> float:
        return bmdlib.region_t_score(value, levels, manufacturer, sex)

    low, high = (t(interval[0]), t(interval[1])) if interval is not None else (float("nan"), float("nan"))
    return t(bmd), low, high


def region_name(levels: Sequence[str]) -> str:
    """The levels a value covers as DXA reports name them: "L2-L4" for a run, "L1, L3, L4" otherwise."""
    idx = [LEVELS.index(lv) for lv in levels]
    if len(idx) > 1 and idx == list(range(idx[0], idx[-1] + 1)):
        return f"{levels[0]}-{levels[-1]}"
    return ", ".join(levels)


def _category(t_score: float, age: float) -> str:
    """WHO category of a T-score as printed; none below WHO_CATEGORY_MIN_AGE (an unknown age keeps it: see t_note)."""
    return NO_WHO_CATEGORY if age < WHO_CATEGORY_MIN_AGE else bmdlib.category_name(int(bmdlib.reported_category(t_score)))


def _t_note(levels: Sequence[str], manufacturer: str, sex: str, age: float) -> str:
    """Which reference the T-score is on, and who its WHO category is for (clinical.md)."""
    pattern = f"{sex} level pattern" if sex else "sex unknown: both sexes' level patterns averaged"
    note = f"T-score on the {manufacturer} young-adult reference of {region_name(levels)} ({pattern})"
    if age < WHO_CATEGORY_MIN_AGE:
        return (f"{note}; age {age:.0f}: WHO categories are for postmenopausal women and men >= {WHO_CATEGORY_MIN_AGE:g}, "
                "younger patients need an age- and sex-matched Z-score, which this report does not give")
    if np.isnan(age):
        return f"{note}; age unknown: WHO categories apply to postmenopausal women and men >= {WHO_CATEGORY_MIN_AGE:g} only"
    return note


def _without_flagged(used: list[LevelResult], manufacturer: str, sex: str, age: float) -> str:
    """The patient value without the levels flagged as ISCD outliers ("" when none is): ISCD lets the reader
    exclude such a level, and the report should not make them recompute it."""
    out = [lv.level for lv in used if lv.iscd_outlier]
    if not out:
        return ""
    rest = [lv for lv in used if not lv.iscd_outlier]
    head = f"without {', '.join(out)} (flagged)"
    if len(rest) < MIN_LEVELS_FOR_DIAGNOSIS:
        return f"{head}: not evaluable, {len(rest)} level(s) left (ISCD requires at least {MIN_LEVELS_FOR_DIAGNOSIS})"
    names = [lv.level for lv in rest]
    value = bmdlib.patient_bmd([lv.bmd for lv in rest])
    t_score = bmdlib.region_t_score(value, names, manufacturer, sex)
    return f"{head}: {region_name(names)} BMD {value:.3f} g/cm², T {t_score:+.1f}, {_category(t_score, age)}"


def _patient(levels: list[LevelResult], manufacturer: str, sex: str, age: float, ref: Reference,
             problem: str) -> PatientResult:
    """ISCD patient value; not evaluable with the study's ``problem`` where it could not be read or prepared."""
    used = [lv for lv in levels if lv.evaluable]
    pat_bmd = bmdlib.patient_bmd([lv.bmd for lv in used])
    res = PatientResult(evaluable=bool(np.isfinite(pat_bmd)), levels_used=[lv.level for lv in used])
    if res.evaluable:
        res.bmd = pat_bmd
        res.t_score, res.t_low, res.t_high = _t_scores(pat_bmd, ref.interval(pat_bmd, patient=True), res.levels_used,
                                                       manufacturer, sex)
        res.category = _category(res.t_score, age)
        res.interval_note = ref.interval_note()
        res.t_note = _t_note(res.levels_used, manufacturer, sex, age)
        res.without_flagged = _without_flagged(used, manufacturer, sex, age)
    elif problem:
        res.reason = f"not evaluable: {problem}"
    else:
        names = ", ".join(res.levels_used) or "none"
        res.reason = (f"not evaluable: {len(used)} evaluable level(s) ({names}); ISCD requires at least "
                      f"{MIN_LEVELS_FOR_DIAGNOSIS} of L1-L4")
    l1 = next((lv for lv in levels if lv.level == "L1"), None)
    if l1 is not None and np.isfinite(l1.hu_mean):
        res.l1_hu = l1.hu_mean
        res.l1_hu_rule = HU_RULE_NAMES[int(hu_category(np.array([l1.hu_mean]))[0])]
        res.l1_totalseg_flag = (f"osteoporosis (L1 median < {TOTALSEG_OSTEOPOROSIS_HU:g} HU; {TOTALSEG_PHASE_NOTE})"
                                if l1.hu_median < TOTALSEG_OSTEOPOROSIS_HU
                                else f"no flag (L1 median >= {TOTALSEG_OSTEOPOROSIS_HU:g} HU; {TOTALSEG_PHASE_NOTE})")
    else:
        res.l1_hu_rule = res.l1_totalseg_flag = "L1 not evaluable"
    return res


def flag_outlier_levels(levels: list[LevelResult]) -> None:
    """Flag an evaluable level whose T-score differs by more than ISCD_ADJACENT_T_DIFFERENCE from each
    evaluable adjacent level and from the median of the other evaluable levels (ISCD 2019: such a vertebra
    may be excluded, e.g. for a fracture or degenerative change; the median keeps the normal neighbour of an
    outlier from being flagged too). Flagged, not excluded: that is the reader's decision."""
    limit = ISCD_ADJACENT_T_DIFFERENCE
    for i, lv in enumerate(levels):
        neighbours = [n for n in levels[max(i - 1, 0):i] + levels[i + 1:i + 2] if n.evaluable]
        others = [o.t_score for o in levels if o.evaluable and o is not lv]
        if (lv.evaluable and neighbours and abs(lv.t_score - float(np.median(others))) > limit
                and all(abs(lv.t_score - n.t_score) > limit for n in neighbours)):
            lv.iscd_outlier = True
            lv.flags.append(f"T-score differs by more than {limit:g} from {' and '.join(n.level for n in neighbours)} "
                            "(ISCD: consider excluding this level, e.g. fracture or degenerative change)")


def _study_flags(study: StudyInput, ref: Reference, levels: list[LevelResult]) -> list[str]:
    flags = []
    if study.scanner and ref.scanners and study.scanner not in ref.scanners:
        flags.append(f"scanner {study.scanner!r} not seen in this site's training data")
    flags += sorted({f"{lv.level}: {f}" for lv in levels for f in lv.flags})
    return flags


def screen(model: OsteoNet, studies: Iterable[StudyInput], ref: Reference, predict_cfg, device: str) -> list[StudyReport]:
    """Screening report values of each study (one predict call per cache)."""
    studies = list(studies)
    manufacturer = model.manufacturer
    preds: dict[int, dict[int, dict[str, float]]] = {}
    for cache_id, group in _by_cache(studies).items():
        cache = group[0].cache
        rows = np.concatenate([s.rows for s in group]).astype(int)
        pred = predict(model, SiteData(cache, {}, manufacturer), rows, device, batch_size=int(predict_cfg.batch_size))
        preds[cache_id] = {int(r): {k: pred[k][i] for k in ("sbmd", "bmd", "p")} for i, r in enumerate(rows)}
    reports = []
    for study in studies:
        table, names = study.cache.table, study.cache.feature_names
        by_level: dict[str, LevelResult] = {}
        first = table.iloc[int(study.rows[0])] if len(study.rows) else {}
        sex, age = first.get("sex", ""), float(first.get("age", np.nan))  # from the paired DXA row, if any
        sex = sex if isinstance(sex, str) else ""
        for r in study.rows:
            row, p = table.iloc[int(r)], preds[id(study.cache)][int(r)]
            level = LevelResult(row["level"], True, hu_mean=float(row["hu_mean"]), hu_median=float(row["hu_median"]),
                                flags=_level_flags(row, study.cache.features[int(r)], names, ref, predict_cfg))
            by_level[level.level] = level
            if not np.isfinite([p["sbmd"], p["bmd"], *p["p"]]).all():  # the HU, measured, stay for the L1-HU rule
                level.evaluable, level.reason = False, "model gave no finite prediction"
                continue
            level.sbmd, level.bmd = float(p["sbmd"]), float(p["bmd"])
            level.t_score, level.t_low, level.t_high = _t_scores(level.bmd, ref.interval(level.bmd, patient=False),
                                                                 [level.level], manufacturer, sex)
            level.category = _category(level.t_score, age)
            level.p_osteoporosis = float(p["p"][OSTEOPOROSIS])
        reason = study.problem or "not evaluated"
        levels = [by_level.get(lv) or LevelResult(lv, False, reason=study.excluded.get(lv, reason)) for lv in LEVELS]
        flag_outlier_levels(levels)
        reports.append(StudyReport(study.study_id, study.source, study.scanner, manufacturer, levels,
                                   _patient(levels, manufacturer, sex, age, ref, study.problem),
                                   _study_flags(study, ref, levels)))
    return reports


def _by_cache(studies: list[StudyInput]) -> dict[int, list[StudyInput]]:
    groups: dict[int, list[StudyInput]] = defaultdict(list)
    for s in studies:
        if len(s.rows):
            groups[id(s.cache)].append(s)
    return groups


def new_ct_cache(study_id: str, crops: list, features: np.ndarray, feature_names: list[str]) -> SiteCache:
    """An in-memory cache of one new CT's crops (``crops.VertebraCrop``), so that it is predicted exactly
    as a prepared study is."""
    rows = [{c: np.nan for c in INDEX_COLUMNS} | {
        "study_id": study_id, "patient_id": "", "level": c.level, "level_idx": LEVELS.index(c.level), "labeled": False,
        "scanner": "", "hu_mean": c.hu_mean, "hu_median": c.hu_median, "hu_std": c.hu_std,
        "body_volume_ml": c.body_volume_ml, "category": -1, "sex": ""} for c in crops]
    table = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    size = crops[0].crop.shape if crops else (1, 1, 1)
    stack = (lambda name, dtype: np.stack([getattr(c, name) for c in crops]) if crops else np.zeros((0, *size), dtype))
    return SiteCache(Path(study_id), table, stack("crop", np.int16), stack("mask", np.uint8),
                     np.asarray(features, np.float32).reshape(len(crops), len(feature_names)), list(feature_names),
                     {"site": "new"})
