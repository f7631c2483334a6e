"""Clinical constants, each once, with its source (see ../shared/reference/clinical.md)."""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4")
"""Lumbar levels that DXA reports and this project models, in anatomical order."""

# --- Vertebra label conventions -------------------------------------------------------------------
# TotalSegmentator v2 `total` task: L5=27, L4=28, L3=29, L2=30, L1=31 (TotalSegmentator class map).
# VerSe challenge: L1=20 ... L4=23 (Sekuboyina et al. 2021, VerSe label ids).
LABEL_PRESETS: Mapping[str, Mapping[str, int]] = MappingProxyType(
    {
        "totalseg_total": MappingProxyType({"L1": 31, "L2": 30, "L3": 29, "L4": 28}),
        "verse": MappingProxyType({"L1": 20, "L2": 21, "L3": 22, "L4": 23}),
        "plain": MappingProxyType({"L1": 1, "L2": 2, "L3": 3, "L4": 4}),
    }
)
TOTALSEG_TOTAL_NEIGHBOURS: Mapping[str, int] = MappingProxyType({"T12": 32, "L5": 27})
"""TotalSegmentator v2 `total` ids of the vertebrae next to L1-L4 (class map; clinical.md)."""

# --- WHO T-score categories (WHO 1994 technical report; clinical.md) --------------------------------
T_NORMAL_MIN = -1.0
"""normal: T >= -1.0"""
T_OSTEOPOROSIS_MAX = -2.5
"""osteoporosis: T <= -2.5; osteopenia in between."""
CATEGORIES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")
T_SCORE_DECIMALS = 1
"""T- and Z-scores are reported to one decimal (ISCD Official Positions 2019, adult: DXA reporting), and the
category a reader sees is that of the printed value: T -2.46 prints as -2.5 and is osteoporosis."""

# --- Standardised BMD: Hui et al. 1997, J Bone Miner Res 12:1463 (spine) ----------------------------
# sBMD = slope * (BMD - offset) + HUI_SBMD_CONSTANT   (g/cm^2)
HUI_SBMD_CONSTANT = 1.0436
HUI_1997: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "hologic": (1.0550, 0.972),
        "ge_lunar": (0.9683, 1.100),
        "norland": (0.9743, 0.969),
    }
)
"""manufacturer -> (slope, offset) of the Hui 1997 sBMD equation."""

MANUFACTURER_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "hologic": "hologic",
        "ge lunar": "ge_lunar",
        "ge_lunar": "ge_lunar",
        "ge-lunar": "ge_lunar",
        "lunar": "ge_lunar",
        "ge healthcare": "ge_lunar",
        "ge": "ge_lunar",
        "norland": "norland",
        # Vendor names as DICOM Manufacturer (0008,0070) and DXA report exports write them; matched after
        # strip().lower(). Add a spelling here when a site's export uses one not listed.
        "hologic, inc.": "hologic",
        "hologic inc.": "hologic",
        "hologic inc": "hologic",
        "ge healthcare lunar": "ge_lunar",
        "ge medical systems": "ge_lunar",
        "ge medical systems lunar": "ge_lunar",
        "lunar corp.": "ge_lunar",
        "lunar corporation": "ge_lunar",
        "norland medical systems": "norland",
        "norland corp.": "norland",
        "norland stratec": "norland",
    }
)
"""Spellings seen in DXA exports, normalised to the keys of HUI_1997."""

# --- Young-adult spine (L1-L4) reference for T-scores, per manufacturer (g/cm^2) ------------------
# Hologic's young-adult reference, L1-L4 mean 1.047, SD 0.110 (Kelly 1988, Hologic reference database);
# the other manufacturers' values follow from Genant et al. 1994 spine cross-calibration
# (Lunar = 1.074 x Hologic + 0.054; Norland = 1.068 x Hologic - 0.070; SD scaled by the slope):
# Lunar 1.178 / 0.118 agrees with Lunar's own published 1.18 / 0.12.
YOUNG_ADULT_REFERENCE: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "hologic": (1.047, 0.110),
        "ge_lunar": (1.074 * 1.047 + 0.054, 1.074 * 0.110),
        "norland": (1.068 * 1.047 - 0.070, 1.068 * 0.110),
    }
)
"""manufacturer -> (young-adult mean, SD) of L1-L4 areal BMD on that manufacturer's scale."""

# --- DXA areal BMD across L1-L4, reference means (g/cm^2, SD ~0.12-0.13; clinical.md table) --------
LEVEL_REFERENCE_BMD: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        "male": MappingProxyType({"L1": 0.999, "L2": 1.073, "L3": 1.081, "L4": 1.071}),
        "female": MappingProxyType({"L1": 0.960, "L2": 1.064, "L3": 1.100, "L4": 1.086}),
    }
)
LEVEL_REFERENCE_SD = 0.125
"""Young-adult SD of ONE vertebra's BMD on LEVEL_REFERENCE_BMD's (Hologic-like) scale: clinical.md gives
0.12-0.13, wider than the L1-L4 mean's 0.110 (YOUNG_ADULT_REFERENCE) because the levels are not perfectly
correlated. bmd.region_t_score takes the SD of a mean of k levels from the two, with the levels equicorrelated."""

# --- Clinical reporting of the lumbar spine (ISCD Official Positions 2019, adult) --------------------
# Use L1-L4; exclude vertebrae with local structural change; use as many as possible, at least two;
# classification must not rest on a single vertebra.
MIN_LEVELS_FOR_DIAGNOSIS = 2
MAX_EXCLUDED_LEVELS = 2
ISCD_ADJACENT_T_DIFFERENCE = 1.0
"""ISCD 2019: a vertebra may be excluded as anatomically abnormal when its T-score differs from the adjacent
vertebrae by more than 1.0 (the reader decides; osteo-predict flags it)."""

# --- CT-only rules -----------------------------------------------------------------------------------
PICKHARDT_L1_HU_SENSITIVE = 160.0
"""Pickhardt et al. 2013, Ann Intern Med: L1 trabecular HU <= 160 is 90 % sensitive for osteoporosis."""
PICKHARDT_L1_HU_SPECIFIC = 110.0
"""Pickhardt et al. 2013: L1 trabecular HU <= 110 is > 90 % specific for osteoporosis."""
TOTALSEG_OSTEOPOROSIS_HU = 90.25
"""TotalSegmentator spine report: osteoporosis below 90.25 HU median body attenuation (non-contrast)."""
TOTALSEG_CONTRAST_OFFSET_HU = MappingProxyType({"arterial": 20.0, "portal-venous": 14.75})
"""TotalSegmentator: contrast raises the threshold by these HU (clinical.md); osteo-predict cannot tell the phase."""

# --- Who the WHO categories are for -------------------------------------------------------------------
WHO_CATEGORY_MIN_AGE = 50.0
"""clinical.md (WHO/ISCD): T-score categories are meant for postmenopausal women and men >= 50; younger patients
use Z-scores (age- and sex-matched), which this product does not compute. Age 50 stands in for menopause, which
no input records."""

# --- Plausibility bounds (engineering limits, not diagnostic thresholds) ---------------------------
BMD_PLAUSIBLE_RANGE = (0.2, 2.5)
"""Areal spine BMD outside this range (g/cm^2) is a data error, not a patient."""
T_SCORE_PLAUSIBLE_RANGE = (-8.0, 8.0)
"""A DXA T-score outside this range is not a T-score (a percentage of the young-adult mean, a BMD in mg/cm^2, a
typo): the lowest plausible BMD (0.2 g/cm^2) is T -7.2 to -8.3 on each device's YOUNG_ADULT_REFERENCE. Kept wide and
symmetric: a T-score inside it but in the wrong column is caught against its BMD (T_SCORE_MISMATCH_TOLERANCE)."""
T_SCORE_MISMATCH_TOLERANCE = 1.5
"""Largest |given T-score - T-score of the level's BMD on its level's reference (bmd.region_t_score, as DXA reports
score each vertebra)| accepted. The vendors' own reference databases and their versions differ from
LEVEL_REFERENCE_BMD by a few tenths, a sex-blind reference (sex unknown) by up to ~0.15, and an export that gives T
on the L1-L4 reference instead by 0.7-1.2 at L1 for BMD 1.0-0.6 (a woman's L1 is 91 % of her L1-L4 mean). The
given T is not used as a label (dxa.level_labels), so only values in the wrong column matter, and they differ by
more (a BMD of 0.93 pasted as T for T -1.1; T 2.0 given for a BMD that is T -3.1)."""
AGE_PLAUSIBLE_RANGE = (18.0, 110.0)
"""Age in years at a DXA exam: T-scores and the WHO categories apply to adults (ISCD Official Positions 2019; children
are reported in Z-scores); ages above 110 are typing errors in practice."""
AGE_MISMATCH_TOLERANCE_YEARS = 2.0
"""Largest spread of the birth year that age and dxa_date imply across one patient_id's DXA rows: ages are whole years
(each up to 1 year below the exact age), so a larger spread means two people under one id."""

VERTEBRA_MAX_VOLUME_ML = 150.0
"""A whole lumbar vertebra (body and posterior elements) is ~40-100 ml in adults (TotalSegmentator's example
CT: L1-L4 58-65 ml); a larger "vertebra" is an organ under a wrong label id (spleen 150-250 ml)."""
VERTEBRA_MIN_BONE_HU = 110.0
"""90th percentile HU of a whole vertebra label: cortical shell, endplates and posterior elements keep it above this
even in severe osteoporosis (TotalSegmentator's example CT at 3 mm: 356-412 HU). Unenhanced soft tissue stays
below it (fat < 0, gallbladder and blood ~0-50, pancreas, muscle, spleen and liver ~40-65 HU mean, their 90th
percentile within ~30 HU of that). It was 150 HU: that excluded the weakest patients of the benchmark's
osteoporosis clinic (`strong_shift` site_c, 5 mm slices, CT slope 0.85: T -4.8 to -5.8, 90th percentile 120-149
HU), 18 levels and 3 whole studies over seeds 0-2, the very patients screening is for. A strongly enhanced organ
may pass: the volume, pieces, bone-coverage and axis checks back this one up."""
BODY_MIN_FRACTION = 0.35
"""Least share of the whole vertebra mask that the part kept as the body may have. Measured with the canal cut
of ``anterior_body``: correct levels keep 70-71 % (real TotalSegmentator example CT, L1-L4) and 64-78 % (1260
synthetic levels); with front and back swapped (header without orientation, flipped label map) the kept
posterior arch is 13-22 % (real) and 9-16 % (synthetic). 0.35 lies well clear of both."""
MAX_SECOND_PIECE = 0.2
"""Largest second connected piece of a level's label, relative to the largest, still taken as a stray fragment.
Real TotalSegmentator specks are tiny (0.04 % beside T12 of the real DICOM case); a vertebra cut by one empty
slice gives two halves (real L1: 49 %), and which half gets measured would be chance."""
BONE_COVERAGE_MARGIN_MM = 6.0
"""How far around a level's mask (in its own slices) dense bone is looked for, for :data:`MIN_BONE_COVERAGE`."""
MIN_BONE_COVERAGE = 0.4
"""Least share of the dense bone around a level's mask, in the slices it spans, that the mask must hold; dense
for this vertebra is at or above its mask's own 90th-percentile HU (a fixed 250 HU excluded a synthetic
osteoporotic L4 whose brightest voxel was 241 HU). A mask on its vertebra holds most of it (TotalSegmentator's
example CT at 3 mm, L1-L4: 0.65-0.75; 604 synthetic L1-L4 levels: 0.81 and above); the same label map mirrored
left-right, header untouched (the classic radiological/neurological flip: each mask 15-18 mm sideways, Dice
0.37-0.50 with its vertebra, L1's median HU 66 instead of 106) holds 0.17-0.26, and passed every other check.
Bright structures beside the spine (an arterial-phase aorta) lower the share of a correct mask; a site whose
correct levels are excluded for this sees the reason in its quarantine.csv."""
MIN_RELATIVE_VOLUME = 0.55
"""Least volume of a level's label, relative to the median of the other levels' in the same scan, for it to be
a whole vertebra. Lumbar vertebrae grow from L1 to L4: TotalSegmentator's example CT, L1-L4 0.92-1.07; 588
synthetic levels clear of the scan edge, wedge fractures included, 0.68-1.37. A label that covers part of its
vertebra, the rest labelled as a neighbour (a boundary put mid-body), would be measured and labelled as if whole:
the example CT with L1's upper slices relabelled L2 leaves L1 at 26 % (the phantom's half-relabelled L1: 50 %),
and L2 falls in two pieces (:data:`MAX_SECOND_PIECE`)."""
MAX_BODY_SHARE_EXCESS = 0.2
"""How far the share of a level's vertebra kept as its body (:data:`BODY_MIN_FRACTION`) may exceed the median
share of the other levels of the scan. Levels of one scan agree: TotalSegmentator's example CT 70-71 %; 392
synthetic levels within -0.08 to +0.10 of the others. The example CT with L1's lower slices relabelled L2 (a
boundary put too high: L1's inferior articular and spinous processes, which reach down beside L2, join L2 in one
piece) gave L2 a "body" of its whole label, 77 ml against 43, mean HU 127 -> 157, and left L1 its body without
its arch: both 100 %, +0.29 over the other levels. One-sided: a fractured
body is a smaller share, and is kept. Body-only label maps keep every level whole (shares all ~100 %)."""
SPINE_MAX_AXIAL_OFFSET_MM = 50.0
"""A lumbar level farther than this (axial plane) from the median of the other levels is not on the same spine."""

CT_AIR_CHECK_HU = -500.0
"""Air is -1000 HU by definition of the Hounsfield scale, and every CT field of view holds some (outside
the body, lungs, bowel gas). If even the CT_AIR_CHECK_PERCENTILE-th percentile lies above this, the values
are not HU (e.g. raw stored values without the DICOM rescale intercept, which puts air near 0)."""
CT_AIR_CHECK_PERCENTILE = 0.5
CT_BODY_TISSUE_HU = (-200.0, 200.0)
"""Median HU of the voxels inside the body (air/padding split off by Otsu): a mix of fat (-100 HU), water,
muscle and organs (0-60 HU, ~150 with contrast) and some bone lies in this range in any adult torso CT;
raw stored values without the rescale intercept put it near +1000, a rescale applied twice near -1000."""
CT_AIR_LIKE_HU = -300.0
CT_AIR_MEDIAN_HU = (-1200.0, -700.0)
"""Median of the voxels below CT_AIR_LIKE_HU (the scan's constant fill left out): air is -1000 HU, aerated
lung about -900 to -700 (emphysema is scored below -950); fat (-100) and all denser tissue lie above the cut.
A rescale slope off by a factor (x2, x0.5; x1.5 puts air at -1500) moves it out while the body tissue stays
plausible. Measured: -993 to -807 on the synthetic sites and the real example CTs; x0.5 gives -497 to -414,
x1.5 -1490 to -1196 (caught except at the synthetic site whose scanner already reads air at -810), x2 -1986
to -1416. Slope errors within ~25 % and offsets of ~100 HU stay undetectable from the image alone."""
