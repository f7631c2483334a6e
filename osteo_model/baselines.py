"""Baselines in the same harness and on the same splits as the model.

- ``hu_threshold``: the CT-only L1 trabecular-HU rule. Score -HU (AUC needs no threshold); category
  from Pickhardt et al. 2013: HU <= 110 (> 90 % specific) osteoporosis, <= 160 (90 % sensitive)
  osteopenia-or-worse, else normal; also the binary TotalSegmentator rule (< 90.25 HU, non-contrast).
  Vertebra level: each vertebra's own HU; patient level: the study's L1 HU, as the rule is defined (the next
  level down where the CT has none: ``patient_hu``), against the patient category of the endpoints.
- ``radiomics_linear``: radiomic features -> ridge regression of sBMD (device BMD via inverse Hui
  1997, category from the T-score) and logistic regression for osteoporosis, fit on the pooled
  training splits.
- The CNN without self-supervision / without MoE and calibration: the same ``train_central`` with
  ``CNN_VARIANTS`` overrides (see osteo_model.experiments).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from osteo_model import bmd as bmdlib, metrics
from osteo_model.calibration import t_and_category
from osteo_model.constants import LEVELS, PICKHARDT_L1_HU_SENSITIVE, PICKHARDT_L1_HU_SPECIFIC, TOTALSEG_OSTEOPOROSIS_HU
from osteo_model.dataset import SiteData
from osteo_model.metrics import OSTEOPOROSIS, auc, compute_metrics

CNN_VARIANTS: Mapping[str, tuple[str, ...]] = {
    "cnn_no_ssl": ("train.ssl_epochs=0",),
    "cnn_no_moe_calibration": ("model.moe=false", "model.calibration=fixed"),
}
"""Config overrides that turn the full model into each CNN ablation."""


def hu_category(hu: np.ndarray) -> np.ndarray:
    """Pickhardt 2013 thresholds as a 3-class rule."""
    hu = np.asarray(hu, float)
    return np.where(hu <= PICKHARDT_L1_HU_SPECIFIC, 2, np.where(hu <= PICKHARDT_L1_HU_SENSITIVE, 1, 0))


def hu_threshold(table: pd.DataFrame) -> dict[str, float]:
    """Metrics of the HU rule on the labeled rows of ``table`` (cache index rows of one split)."""
    t = table[np.isfinite(table["bmd"].to_numpy(float))]
    res: dict[str, float] = {"num_examples": float(len(t))}
    if not len(t):
        return res
    hu = t["hu_mean"].to_numpy(float)
    cat = t["category"].to_numpy(int)
    osteo = cat == OSTEOPOROSIS
    pred = hu_category(hu)
    flag = hu < TOTALSEG_OSTEOPOROSIS_HU
    res.update({
        "auc": auc(osteo, -hu),
        "acc3": float(np.mean(pred == cat)),
        "totalseg_sensitivity": float(flag[osteo].mean()) if osteo.any() else float("nan"),
        "totalseg_specificity": float((~flag[~osteo]).mean()) if (~osteo).any() else float("nan"),
    })
    # patient level: the DXA patient category exactly as the model's endpoints judge it (metrics.patient_level)
    pat = metrics.patient_level(t["bmd"].to_numpy(float), t)
    if len(pat):
        res["patient_auc_l1"] = auc(pat["cat_true"].to_numpy(int) == OSTEOPOROSIS, -patient_hu(table, pat["study"]))
    return res


def patient_hu(table: pd.DataFrame, studies: Sequence[str]) -> np.ndarray:
    """Each study's L1 trabecular HU as the rule reads it from the CT, also where DXA excluded L1; where the CT
    has no L1 HU the next level down stands in (NaN without any)."""
    rank = table["level"].map({lv: i for i, lv in enumerate(LEVELS)}).fillna(len(LEVELS))
    ordered = table.assign(_rank=rank.to_numpy())
    ordered = ordered[np.isfinite(ordered["hu_mean"].to_numpy(float))].sort_values("_rank", kind="stable")
    first_hu = ordered.groupby(ordered["study_id"].astype(str))["hu_mean"].first()
    return first_hu.reindex([str(s) for s in studies]).to_numpy(float)


def _xy(data: SiteData, split: str) -> tuple[np.ndarray, pd.DataFrame]:
    rows = data.splits[split]
    x = np.nan_to_num(np.asarray(data.cache.features[rows], dtype=np.float64), posinf=0.0, neginf=0.0)
    return x, data.cache.table.iloc[rows]


class RadiomicsLinear:
    """Ridge (sBMD) + logistic regression (osteoporosis) on standardised radiomic features."""

    def __init__(self, alpha: float = 1.0, c: float = 0.1) -> None:
        self.reg = make_pipeline(StandardScaler(), Ridge(alpha=alpha))
        self.clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight="balanced"))

    def fit(self, datas: Mapping[str, SiteData]) -> "RadiomicsLinear":
        xs, ts = zip(*(_xy(d, "train") for d in datas.values()))
        x, t = np.concatenate(xs), pd.concat(ts)
        self.reg.fit(x, t["sbmd"].to_numpy(float))
        y = t["category"].to_numpy(int) == OSTEOPOROSIS
        self.clf = self.clf.fit(x, y) if len(np.unique(y)) == 2 else None
        return self

    def predict(self, data: SiteData, split: str) -> dict[str, np.ndarray]:
        x, table = _xy(data, split)
        sbmd = self.reg.predict(x)
        device_bmd = np.asarray(bmdlib.from_sbmd(sbmd, data.manufacturer))
        t, cat = t_and_category(device_bmd, data.manufacturer, table)
        p_osteo = self.clf.predict_proba(x)[:, 1] if self.clf is not None else -t
        p = np.stack([np.zeros_like(p_osteo), np.zeros_like(p_osteo), p_osteo], 1)
        return {"sbmd": sbmd, "bmd": device_bmd, "p": p, "t": t, "category": cat}

    def evaluate(self, data: SiteData, split: str) -> dict[str, float]:
        res = compute_metrics(self.predict(data, split), data.cache.table.iloc[data.splits[split]], data.manufacturer)
        res.pop("acc3_head", None)  # no 3-class head: its p holds only the osteoporosis probability
        return res
