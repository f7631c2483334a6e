"""Synthetic patients: true bone density, its CT appearance parameters and the site's DXA exams.

Everything here is tables (no volumes), so a population can be drawn and checked in milliseconds.
True standardised BMD (sBMD, Hui 1997 scale) depends on age and sex and follows the clinical L1-L4
pattern; the DXA device reads it through the inverse Hui equation plus the site's bias, drift and
precision, each patient's own device error, and what DXA sees but a trabecular CT ROI does not
(osteophytes and endplate sclerosis, aortic calcification projected over the spine). Portal-venous
contrast raises some CTs' trabecular HU at equal bone. A site's profile may override the population
(screening vs osteoporosis clinic: age and bone status).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from osteo_model import bmd
from osteo_model.constants import HUI_1997, LEVEL_REFERENCE_BMD, LEVELS, MAX_EXCLUDED_LEVELS, YOUNG_ADULT_REFERENCE
from osteofl.simulation.phantom import PHANTOM_LEVELS
from osteofl.simulation.scanners import site_seed

# The young-adult reference on the sBMD scale: the manufacturers' references agree there within 0.005.
SBMD_YOUNG_MEAN = float(np.mean([bmd.to_sbmd(YOUNG_ADULT_REFERENCE[m][0], m) for m in HUI_1997]))
SBMD_YOUNG_SD = float(np.mean([HUI_1997[m][0] * YOUNG_ADULT_REFERENCE[m][1] for m in HUI_1997]))


@dataclass
class SitePopulation:
    """One site's draw: ``studies`` (one row per CT, with phantom parameters), ``vertebrae`` (truth,
    one row per study x L1-L4) and ``dxa`` (the rows of the site's dxa.csv)."""

    site: str
    profile: dict[str, Any]
    studies: pd.DataFrame
    vertebrae: pd.DataFrame
    dxa: pd.DataFrame


def _level_pattern(sex: str) -> np.ndarray:
    """T12..L5 relative to the L1-L4 mean (clinical reference for L1-L4; T12 ~ L1, L5 ~ L4)."""
    ref = np.array([LEVEL_REFERENCE_BMD[sex][level] for level in LEVELS])
    ref = ref / ref.mean()
    return np.concatenate([[ref[0] * 0.97], ref, [ref[-1]]])


def _true_bone(rng: np.random.Generator, sex: str, age: int, pop: DictConfig,
               bone_cfg: DictConfig) -> tuple[float, np.ndarray, np.ndarray]:
    """Patient status (young-adult SD units), true sBMD of T12..L5 and each level's volumetric status."""
    t50, per_year = (pop.female_t_at_50, pop.female_t_per_year) if sex == "female" else \
        (pop.male_t_at_50, pop.male_t_per_year)
    status = t50 + per_year * (age - 50) + rng.normal(0, pop.t_sd)
    pattern = _level_pattern(sex)
    sbmd = (SBMD_YOUNG_MEAN + status * SBMD_YOUNG_SD) * pattern * (1 + rng.normal(0, pop.level_sd, 6))
    sbmd = np.clip(sbmd, 0.35, None)
    # CT sees volumetric density: areal BMD over body size, which grows faster than the L1-L4 pattern.
    size = pattern * (1 + bone_cfg.level_hu_trend * (np.arange(6) - 2.5))
    return float(status), sbmd, (sbmd / size - SBMD_YOUNG_MEAN) / SBMD_YOUNG_SD


def _bone_parameters(status: np.ndarray, rng: np.random.Generator, b: DictConfig) -> dict[str, np.ndarray]:
    """CT appearance of each level (T12..L5) from its bone status (young-adult SD units).

    Wedge fractures strike L1-L4 more often the weaker the bone (at most ``b.fracture_max`` per level).
    """
    trab = status + rng.normal(0, b.trab_sd, status.shape)
    risk = b.fracture_max / (1.0 + np.exp(2.0 * (status + 2.5)))
    fractured = (rng.uniform(size=status.shape) < risk) & np.isin(PHANTOM_LEVELS, LEVELS)
    return {
        "wedge": np.where(fractured, rng.uniform(0.2, 0.4, status.shape), 0.0),
        "bvtv": np.clip(b.bvtv_ref + b.bvtv_per_sd * trab, *b.bvtv_range),
        "coarse": 1.0 / (1.0 + np.exp(1.5 * (trab + 1.0))),
        "perforation": np.clip(0.04 - 0.07 * trab, 0.0, 0.45),
        "cortex_mm": np.clip(b.cortex_mm + 0.2 * status, 0.6, 2.0),
        "cortex_hu": b.cortex_hu + 70.0 * status,
        "posterior_hu": b.posterior_hu + 50.0 * status,
        "trab_status": trab,
    }


def _dxa_gain(rng: np.random.Generator, age: int, calcifications: int, years: float, profile: dict[str, Any],
              d: DictConfig) -> np.ndarray:
    """Relative L1-L4 reading of one patient's DXA over the truth (1 = exact), beyond the device bias:
    the patient's own device error (positioning, soft tissue, ROI placement), the site's drift since
    ``dxa.date_start``, degenerative change (osteophytes, endplate sclerosis, facet arthrosis: more
    often with age and lower in the spine) and aortic calcification over the vertebrae on the AP scan."""
    gain = np.full(4, 1.0 + rng.normal(0, d.patient_error) + float(profile.get("dxa_drift_per_year", 0.0)) * years)
    p_degenerative = np.clip(d.degenerative_at_50 + d.degenerative_per_decade * (age - 50) / 10, 0.0, 0.9)
    if rng.uniform() < p_degenerative:
        gain += rng.uniform(*d.degenerative_gain) * np.asarray(d.degenerative_level_weight) * rng.uniform(0.5, 1.0, 4)
    return gain + d.aortic_gain_per_plaque * calcifications * np.array([0.5, 1.0, 1.0, 1.0])


def _dxa_measurement(rng: np.random.Generator, true_bmd: np.ndarray, fractured: np.ndarray,
                     profile: dict[str, Any], d: DictConfig, gain: np.ndarray) -> np.ndarray:
    """Device BMD of L1-L4 as reported: bias, ``gain`` (_dxa_gain) and precision of the site's device,
    excluded levels NaN.

    A fractured vertebra reads falsely dense, so reporting excludes it first (ISCD: at most two).
    """
    measured = true_bmd * (1 + profile["dxa_bias"]) * gain + rng.normal(0, profile["dxa_noise"], 4)
    measured[fractured] *= 1.1
    n_random = int(rng.uniform() < d.exclude_one_level) + int(rng.uniform() < d.exclude_two_levels)
    order = np.concatenate([np.flatnonzero(fractured), rng.permutation(np.flatnonzero(~fractured))])
    measured[order[: min(MAX_EXCLUDED_LEVELS, int(fractured.sum()) + n_random)]] = np.nan
    return measured


def _dxa_interval(rng: np.random.Generator, d: DictConfig) -> int:
    u = rng.uniform()
    if u < d.interval_within_90:
        days = rng.integers(0, 91)
    elif u < d.interval_within_90 + d.interval_within_180:
        days = rng.integers(91, 181)
    else:
        days = rng.integers(181, d.interval_max_days + 1)
    return int(days) * (1 if rng.uniform() < 0.5 else -1)


def sample_site(synth: DictConfig, site: str, profile: dict[str, Any], n_labeled: int, n_unlabeled: int,
                max_interval_days: int) -> SitePopulation:
    """Draw one site's patients (one CT each; the first ``n_labeled`` also have a DXA exam)."""
    rng = np.random.default_rng(site_seed(synth.seed, site) + [2])
    extra = np.random.default_rng(site_seed(synth.seed, site) + [4])  # contrast, DXA error and artefacts
    pop = OmegaConf.merge(synth.population, profile.get("population") or {})
    bone_cfg, dcfg = synth.bone, synth.dxa
    manufacturer = bmd.normalise_manufacturer(profile["dxa_manufacturer"])
    start = date.fromisoformat(dcfg.date_start)
    studies, vertebrae, dxa_rows = [], [], []
    for k in range(n_labeled + n_unlabeled):
        patient_id, study_id = f"{site}-P{k:05d}", f"{site}-CT{k:05d}"
        sex = "female" if rng.uniform() < pop.female_fraction else "male"
        age = int(np.clip(round(rng.normal(pop.age_mean, pop.age_sd)), *pop.age_range))
        status, sbmd, level_status = _true_bone(rng, sex, age, pop, bone_cfg)
        params = _bone_parameters(level_status, rng, bone_cfg)
        marrow = bone_cfg.marrow_hu_at_40 + bone_cfg.marrow_hu_per_year * (age - 40) + rng.normal(0, bone_cfg.marrow_hu_sd)
        u = rng.uniform()
        truncated = "" if u >= synth.phantom.truncated_fraction else ("L1" if u < synth.phantom.truncated_fraction / 2 else "L4")
        ct_date = start + timedelta(days=int(rng.integers(0, dcfg.date_days)))
        labeled = k < n_labeled
        contrast = float(extra.uniform(*synth.ct.contrast_hu)) if extra.uniform() < float(profile.get("contrast_fraction", 0.0)) else 0.0
        marrow += contrast / (1.0 - bone_cfg.bvtv_ref)  # enhancing marrow: +contrast HU in the trabecular ROI
        calcifications = int(extra.poisson(synth.phantom.calcifications_per_decade * max(age - 50.0, 0.0) / 10.0))
        study = {
            "site": site, "study_id": study_id, "patient_id": patient_id, "sex": sex, "age": age,
            "ct_date": ct_date.isoformat(), "status": status, "marrow_hu": float(marrow),
            "truncated_level": truncated, "has_dxa": labeled, "contrast_hu": contrast, "calcifications": calcifications,
            "bone": {name: {key: float(params[key][i]) for key in
                            ("bvtv", "coarse", "perforation", "cortex_mm", "cortex_hu", "posterior_hu", "wedge")}
                     for i, name in enumerate(PHANTOM_LEVELS)},
        }
        true_bmd = bmd.from_sbmd(sbmd[1:5], manufacturer)
        measured, gain = np.full(4, np.nan), np.full(4, np.nan)
        interval = np.nan
        if labeled:
            interval = _dxa_interval(rng, dcfg)
            dxa_date = ct_date + timedelta(days=interval)
            gain = _dxa_gain(extra, age, calcifications, (dxa_date - start).days / 365.25, profile, dcfg)
            measured = _dxa_measurement(rng, true_bmd, params["wedge"][1:5] > 0, profile, dcfg, gain)
            printed_t = bmd.level_t_score(measured, range(len(LEVELS)), manufacturer, [sex] * len(LEVELS))  # as a printout
            dxa_rows.append({
                "patient_id": patient_id, "dxa_date": dxa_date.isoformat(),
                "manufacturer": profile["dxa_manufacturer"], "model": profile["dxa_model"],
                **{f"bmd_{lv.lower()}": measured[i] for i, lv in enumerate(LEVELS)},
                **{f"t_{lv.lower()}": t for lv, t in zip(LEVELS, printed_t)},
                "sex": sex, "age": age,
            })
        study["interval_days"] = interval
        study["paired"] = bool(labeled and abs(interval) <= max_interval_days)
        true_t = bmd.level_t_score(true_bmd, range(len(LEVELS)), manufacturer, [sex] * len(LEVELS))
        patient_t = bmd.t_score(bmd.patient_bmd(true_bmd), manufacturer)
        study["true_category"] = bmd.category_name(bmd.category_from_t(patient_t))
        dxa_patient = bmd.patient_bmd(measured)
        study["dxa_category"] = bmd.category_name(bmd.category_from_t(bmd.t_score(dxa_patient, manufacturer)))
        studies.append(study)
        for i, level in enumerate(LEVELS):
            vertebrae.append({
                "site": site, "study_id": study_id, "patient_id": patient_id, "level": level, "sex": sex,
                "age": age, "true_sbmd": sbmd[i + 1], "true_bmd_device": true_bmd[i], "true_t": true_t[i],
                "true_category": bmd.category_name(bmd.category_from_t(true_t[i])),
                "patient_true_category": study["true_category"],
                "dxa_bmd": measured[i], "dxa_gain": gain[i], "dxa_excluded": bool(labeled and np.isnan(measured[i])),
                "has_dxa": labeled, "interval_days": interval, "paired": study["paired"],
                "truncated": truncated == level, "marrow_hu": marrow, "level_status": level_status[i + 1],
                "fractured": bool(params["wedge"][i + 1] > 0),
                **{key: params[key][i + 1] for key in ("trab_status", "bvtv", "coarse", "perforation", "cortex_mm", "wedge")},
            })
    dxa = pd.DataFrame(dxa_rows, columns=[
        "patient_id", "dxa_date", "manufacturer", "model", *(f"bmd_{lv.lower()}" for lv in LEVELS),
        *(f"t_{lv.lower()}" for lv in LEVELS), "sex", "age"])
    return SitePopulation(site, profile, pd.DataFrame(studies), pd.DataFrame(vertebrae), dxa)
