"""Bone-density arithmetic shared by preparation, synthesis, calibration and reports.

Hui 1997 standardisation, T-scores on a device's young-adult reference, WHO categories and the
patient-level L1-L4 rule. The numbers live in ``osteo_model.constants``.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, Sequence

import numpy as np

from osteo_model.constants import (
    CATEGORIES,
    HUI_1997,
    HUI_SBMD_CONSTANT,
    LEVEL_REFERENCE_BMD,
    LEVEL_REFERENCE_SD,
    LEVELS,
    MANUFACTURER_ALIASES,
    MIN_LEVELS_FOR_DIAGNOSIS,
    T_NORMAL_MIN,
    T_OSTEOPOROSIS_MAX,
    T_SCORE_DECIMALS,
    YOUNG_ADULT_REFERENCE,
)


def normalise_manufacturer(name: str) -> str | None:
    """Map a DXA export's manufacturer spelling to a HUI_1997 key; None if unknown."""
    return MANUFACTURER_ALIASES.get(str(name).strip().lower())


def to_sbmd(bmd: np.ndarray | float, manufacturer: str) -> np.ndarray | float:
    """Device areal BMD -> standardised BMD (Hui et al. 1997)."""
    slope, offset = HUI_1997[manufacturer]
    return slope * (bmd - offset) + HUI_SBMD_CONSTANT


def from_sbmd(sbmd: np.ndarray | float, manufacturer: str) -> np.ndarray | float:
    """Standardised BMD -> device areal BMD (inverse of Hui et al. 1997)."""
    slope, offset = HUI_1997[manufacturer]
    return (sbmd - HUI_SBMD_CONSTANT) / slope + offset


def t_score(bmd: np.ndarray | float, manufacturer: str) -> np.ndarray | float:
    """T-score of a device BMD on that device's young-adult reference."""
    mean, sd = YOUNG_ADULT_REFERENCE[manufacturer]
    return (bmd - mean) / sd


def region_t_score(bmd: float, levels: Sequence[str], manufacturer: str, sex: str = "") -> float:
    """T-score of a BMD measured over ``levels`` (one vertebra, or the mean of several) on the young-adult
    reference of those levels, as DXA reports give each vertebra's and each combination's (ISCD 2019: where
    vertebrae are excluded, the T-score comes from the remaining ones). On the L1-L4 reference alone a
    normal woman's L1 reads about 1.3 T below her L3. The reference is the manufacturer's L1-L4 mean scaled
    by the levels' share of it (LEVEL_REFERENCE_BMD, by sex; both sexes averaged where unknown), with the SD
    of a mean of that many levels (:func:`region_sd_factor`); all four levels give :func:`t_score`."""
    mean, sd = region_reference(levels, manufacturer, sex)
    return float((bmd - mean) / sd)


def region_reference(levels: Sequence[str], manufacturer: str, sex: str = "") -> tuple[float, float]:
    """Young-adult (mean, SD) of the BMD over ``levels`` on ``manufacturer``'s scale: what
    :func:`region_t_score` measures against."""
    mean, sd = YOUNG_ADULT_REFERENCE[manufacturer]
    patterns = [LEVEL_REFERENCE_BMD[sex]] if sex in LEVEL_REFERENCE_BMD else list(LEVEL_REFERENCE_BMD.values())
    share = np.mean([np.mean([p[lv] for lv in levels]) / np.mean([p[lv] for lv in LEVELS]) for p in patterns])
    return float(mean * share), float(sd * region_sd_factor(len(levels)))


SEX_CODES: tuple[str, ...] = ("female", "male", "")
"""Row order of :func:`level_reference_table`: a vertebra's sex as an index ("" unknown: both averaged)."""


def sex_codes(sexes: Iterable[str]) -> np.ndarray:
    """Each sex's SEX_CODES index (anything else counts as unknown)."""
    unknown = SEX_CODES.index("")
    return np.array([SEX_CODES.index(s) if s in SEX_CODES else unknown for s in sexes], dtype=np.int64)


@functools.lru_cache(maxsize=None)
def level_reference_table(manufacturer: str) -> tuple[np.ndarray, float]:
    """Each single vertebra's young-adult mean on ``manufacturer``'s scale (rows SEX_CODES, columns LEVELS)
    and one vertebra's SD: the reference a DXA printout gives each level's T-score on, and the one every
    per-vertebra label, prediction and report uses (so a level's category means the same everywhere).
    Computed once per manufacturer (the generator asks for it twice per patient); the array is read-only."""
    means = np.array([[region_reference([lv], manufacturer, sex)[0] for lv in LEVELS] for sex in SEX_CODES])
    means.setflags(write=False)
    return means, region_reference([LEVELS[0]], manufacturer)[1]


def level_t_score(bmd: np.ndarray, levels: Sequence[int], manufacturer: str, sexes: Iterable[str]) -> np.ndarray:
    """T-score of each vertebra's BMD on its own level's reference (:func:`level_reference_table`); NaN
    where the BMD is NaN. ``levels`` (LEVELS indices) and ``sexes`` run along ``bmd`` (a sex outside
    SEX_CODES counts as unknown)."""
    means, sd = level_reference_table(manufacturer)
    return (np.asarray(bmd, dtype=float) - means[sex_codes(sexes), np.asarray(levels, dtype=np.int64)]) / sd


def region_sd_factor(n_levels: int) -> float:
    """Young-adult SD of the mean of ``n_levels`` vertebrae over that of all four. With one level's SD
    s1 (LEVEL_REFERENCE_SD) and equicorrelated levels (correlation rho), the mean of k has SD
    s1 * sqrt((1 + (k - 1) rho) / k); rho follows from the L1-L4 SD (k = 4). On Hologic's scale: 0.125,
    0.115, 0.112 and 0.110 g/cm^2 for 1-4 levels, so one vertebra's |T| is not overstated by ~14 %."""
    ratio = LEVEL_REFERENCE_SD / YOUNG_ADULT_REFERENCE["hologic"][1]
    rho = (len(LEVELS) / ratio**2 - 1) / (len(LEVELS) - 1)
    return float(ratio * np.sqrt((1 + (n_levels - 1) * rho) / n_levels))


def category_from_t(t: np.ndarray | float) -> np.ndarray | int:
    """WHO category index (0 normal, 1 osteopenia, 2 osteoporosis) of ``t`` as it is; -1 where t is NaN.
    Training labels use it on the unrounded T-score; a category a reader sees comes from
    :func:`reported_category`."""
    t_arr = np.asarray(t, dtype=float)
    cat = np.where(t_arr <= T_OSTEOPOROSIS_MAX, 2, np.where(t_arr < T_NORMAL_MIN, 1, 0))
    cat = np.where(np.isnan(t_arr), -1, cat)
    return int(cat) if cat.ndim == 0 else cat


def reported_t(t: np.ndarray | float) -> np.ndarray | float:
    """A T-score as reports print it (T_SCORE_DECIMALS, the same rounding as ``f"{t:.1f}"``), NaN kept."""
    t_arr = np.asarray(t, dtype=float)
    out = np.array([float(f"{v:.{T_SCORE_DECIMALS}f}") for v in t_arr.ravel()]).reshape(t_arr.shape)
    return float(out) if out.ndim == 0 else out


def reported_category(t: np.ndarray | float) -> np.ndarray | int:
    """WHO category of the T-score as printed: a report that says "T -2.5" must say osteoporosis, also where
    the unrounded value is -2.46 (ISCD 2019 reports T to one decimal; clinical categories follow the report).
    The patient-level endpoints and osteo-predict's report use it."""
    return category_from_t(reported_t(t))


def category_name(index: int) -> str:
    return CATEGORIES[index] if index >= 0 else "unknown"


def patient_bmd(level_bmds: Iterable[float]) -> float:
    """Patient-level L1-L4 BMD as clinicians report it (ISCD Official Positions 2019).

    Mean of the evaluable levels among L1-L4 (DXA's total is area-weighted; with equal-sized
    vertebrae that is the mean); NaN when fewer than two levels remain, since a diagnosis must not
    rest on a single vertebra.
    """
    values = [v for v in level_bmds if v is not None and not math.isnan(v)]
    if len(values) < MIN_LEVELS_FOR_DIAGNOSIS:
        return float("nan")
    return float(np.mean(values))
