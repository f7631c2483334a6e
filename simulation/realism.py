"""How realistic a synthetic site is, in the terms clinical studies report: L1 trabecular HU against L1
DXA BMD (Pearson r; studies: ~0.4-0.7) and the L1-HU rule's AUC for DXA osteoporosis (~0.74-0.83), next
to the site's prevalence and label counts. The HU is measured on the rendered CT (l1_roi_hu), as a
radiologist's oval ROI would be; too-easy sites (r ~0.9) leave nothing for a learned model to add. Beside
them, how well a vertebra's level (L1-L4) can be told from its body size alone: lumbar bodies grow from L1
to L4 with overlap between neighbours, so the level head has something to learn, but not everything."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.model_selection import GroupKFold, cross_val_score

from osteo_model.constants import LEVELS
from osteo_model.metrics import auc, pearson_r

ROI_RADIUS = 0.6           # oval ROI: this fraction of the body's lateral and AP semi-axes (clear of the cortex)
ROI_HEIGHT = (0.25, 0.5)   # of the body height above the inferior endplate: below a wedge fracture's reach


def l1_roi_hu(ct: np.ndarray, anatomy, spacing: tuple[float, float, float], per_slice: int) -> float:
    """Mean HU of an oval trabecular ROI in the centre of L1 on the acquired CT (z, y, x) (NaN when the
    scan edge cuts it away). ``spacing``/``per_slice``: the fine render grid and how many of its slices
    one CT slice averages (scanners.render_spacing)."""
    v = next(v for v in anatomy.vertebrae if v.name == "L1")
    sz, sy, sx = spacing
    z = anatomy.z_range[0] + (np.arange(ct.shape[0]) * per_slice + (per_slice - 1) / 2) * sz
    y = anatomy.y_range[0] + np.arange(ct.shape[1]) * sy
    x = anatomy.x_range[0] + np.arange(ct.shape[2]) * sx
    h = v.z1 - v.z0
    zs = (z >= v.z0 + ROI_HEIGHT[0] * h) & (z <= v.z0 + ROI_HEIGHT[1] * h)
    oval = ((x[None, :] - v.xc) / (ROI_RADIUS * v.a)) ** 2 + ((y[:, None] - v.yc) / (ROI_RADIUS * v.b)) ** 2 <= 1
    roi = ct[zs][:, oval]
    return float(roi.mean()) if roi.size else float("nan")


def body_volumes_ml(anatomy) -> list[float]:
    """The phantom's L1-L4 vertebral body volumes (elliptic cylinders), ml, in LEVELS order."""
    by_name = {v.name: v for v in anatomy.vertebrae}
    return [float(np.pi * by_name[lv].a * by_name[lv].b * (by_name[lv].z1 - by_name[lv].z0) / 1000.0) for lv in LEVELS]


LEVEL_FOLDS = 5


def level_size_rule_acc(body_ml: np.ndarray, patients: np.ndarray) -> float:
    """Accuracy of naming a vertebra's level from its body volume alone (one-feature LDA, cross-validated
    in LEVEL_FOLDS folds by patient); ``body_ml``: one row of L1-L4 volumes per study. NaN when too few
    patients to fold (chance: 0.25)."""
    patients = np.asarray(patients)
    if len(np.unique(patients)) < 2 * LEVEL_FOLDS:
        return float("nan")
    x = np.asarray(body_ml, float).reshape(-1, 1)
    y = np.tile(np.arange(len(LEVELS)), len(patients))
    groups = np.repeat(patients, len(LEVELS))
    return float(cross_val_score(LinearDiscriminantAnalysis(), x, y, groups=groups, cv=GroupKFold(LEVEL_FOLDS)).mean())


def site_realism(studies: pd.DataFrame, dxa: pd.DataFrame, l1_hu: np.ndarray, body_ml: np.ndarray) -> dict[str, Any]:
    """Realism of one site: ``studies`` (population rows, one per CT), its dxa.csv rows, each study's
    measured L1 ROI HU and its L1-L4 body volumes (body_volumes_ml). Only DXA-paired studies count for r,
    AUC and prevalence; every study for the level."""
    s = studies.assign(l1_hu=np.asarray(l1_hu, float)).merge(
        dxa[["patient_id", "bmd_l1"]], on="patient_id", how="left")
    paired = s[s["paired"] & (s["dxa_category"] != "unknown")]
    osteo = (paired["dxa_category"] == "osteoporosis").to_numpy()
    hu, l1 = paired["l1_hu"].to_numpy(float), paired["bmd_l1"].to_numpy(float)
    ok = np.isfinite(hu) & np.isfinite(l1)
    return {
        "n_labeled": int(studies["has_dxa"].sum()), "n_paired": int(studies["paired"].sum()),
        "n_unlabeled": int((~studies["paired"]).sum()),
        "prevalence_osteoporosis": float(osteo.mean()) if len(osteo) else float("nan"),
        "l1_hu_dxa_r": pearson_r(hu[ok], l1[ok]),
        "l1_hu_rule_auc": auc(osteo[np.isfinite(hu)], -hu[np.isfinite(hu)]),
        "l1_hu_mean": float(np.nanmean(s["l1_hu"])) if np.isfinite(s["l1_hu"]).any() else float("nan"),
        "level_size_rule_acc": level_size_rule_acc(body_ml, studies["patient_id"].to_numpy()),
    }



def expected_l1_hu(studies: pd.DataFrame, profile: dict[str, Any], tissue_hu: float) -> np.ndarray:
    """Each study's L1 ROI HU as the phantom builds it (trabecular elements of ``tissue_hu`` mixed with
    marrow, contrast included, through the scanner's calibration; before noise and blur): what l1_roi_hu
    measures on the rendered CT to within a few HU, without rendering (a scenario's realism on thousands
    of patients in seconds)."""
    bvtv = np.array([bone["L1"]["bvtv"] for bone in studies["bone"]], dtype=float)
    marrow = studies["marrow_hu"].to_numpy(float)
    return float(profile["hu_slope"]) * (marrow + bvtv * (tissue_hu - marrow)) + float(profile["hu_offset"])
