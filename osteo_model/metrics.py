"""Aggregate evaluation metrics (nothing per patient leaves this module).

Patient level first (the primary endpoints: WHO/ISCD classify the patient, not a vertebra), keys
"patient_*": per study, the mean of the evaluable levels' BMD (osteo_model.bmd.patient_bmd, ISCD 2019:
L1-L4, at least two levels) for prediction and for DXA alike, its T-score on the device's young-adult
reference of the levels that entered it (bmd.region_t_score, by sex where known: ISCD 2019, and what
osteo-predict reports) and the WHO category of that T-score as reports print it (one decimal,
bmd.reported_category); osteoporosis AUC from the predicted patient T-score ("patient_auc_t"),
3-class accuracy and macro-F1, MAE and Pearson r of patient BMD, and Bland-Altman bias and 95 % limits of
agreement of patient BMD, overall and per DXA manufacturer ("patient_bias_bmd_<device>", ...).

Vertebra level (secondary: a vertebra's category partly encodes its level, since each level is compared
with the L1-L4 young-adult reference): osteoporosis AUC (osteoporosis vs not) from the diagnosis head's probability ("auc")
and from the calibrated T-score ("auc_t"); 3-class accuracy and macro-F1 of the category implied by the
calibrated T-score ("acc3", "f1_macro" - the reported category) and of the head's argmax ("acc3_head");
MAE and Pearson r in standardised (sBMD) and device (BMD) scale; Bland-Altman bias and 95 % limits of
agreement of device BMD, overall and per DXA manufacturer.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, roc_auc_score

from osteo_model import bmd as bmdlib
from osteo_model.calibration import t_and_category
from osteo_model.constants import LEVELS

OSTEOPOROSIS = 2
NAN = float("nan")


def value_range(name: str) -> tuple[float, float] | None:
    """The values a metric of this module can take (None where any number can be right: a bias, a limit of
    agreement, a loss): a receiver refuses a reported metric outside its range, which no site computes."""
    base = name.removeprefix("patient_")
    if base.startswith(("auc", "acc3", "f1_", "level_acc")):
        return 0.0, 1.0
    if base.startswith("r_"):
        return -1.0, 1.0
    if base.startswith("mae_") or base in ("n", "num_examples"):
        return 0.0, float("inf")
    return None


def auc(is_positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present."""
    y = np.asarray(is_positive, dtype=bool)
    s = np.asarray(score, dtype=float)
    ok = np.isfinite(s)
    if ok.sum() == 0 or len(np.unique(y[ok])) < 2:
        return NAN
    return float(roc_auc_score(y[ok], s[ok]))


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return NAN
    return float(np.clip(np.corrcoef(a, b)[0, 1], -1.0, 1.0))  # round-off can put it a hair past +-1


def bland_altman(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """(bias, lower, upper): mean of pred - truth and bias -+ 1.96 SD of the differences."""
    d = np.asarray(pred, float) - np.asarray(truth, float)
    if len(d) == 0:
        return NAN, NAN, NAN
    bias, sd = float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else NAN  # one patient: no limits
    return bias, bias - 1.96 * sd, bias + 1.96 * sd


def _classification(prefix: str, true_cat: np.ndarray, pred_cat: np.ndarray) -> dict[str, float]:
    if len(true_cat) == 0:
        return {f"{prefix}acc3": NAN, f"{prefix}f1_macro": NAN}
    return {
        f"{prefix}acc3": float(np.mean(true_cat == pred_cat)),
        f"{prefix}f1_macro": float(f1_score(true_cat, pred_cat, labels=[0, 1, 2], average="macro", zero_division=0)),
    }


def _region_t(bmd: float, g: pd.DataFrame, column: str, device: str) -> float:
    """T-score of a patient BMD on the reference of the levels that entered it (ISCD 2019: where vertebrae
    are excluded the T-score comes from the remaining ones; bmd.region_t_score), as osteo-predict reports it."""
    if np.isnan(bmd):
        return NAN
    levels = [LEVELS[i] for i in g.loc[np.isfinite(g[column].to_numpy(float)), "level"]]
    return bmdlib.region_t_score(bmd, levels, device, str(g["sex"].iloc[0]))


def patient_level(pred_bmd: np.ndarray, table: pd.DataFrame) -> pd.DataFrame:
    """Per study: DXA patient BMD (mean of the levels DXA evaluated) and the predicted one over the same
    levels, T-scores (on those levels' reference and the patient's sex, both sexes averaged where unknown)
    and WHO categories. A level DXA excluded (degenerative change) is left out of the prediction too, or
    the two would describe different bone."""
    df = pd.DataFrame({
        "study": table["study_id"].astype(str).to_numpy(),
        "device": table["dxa_manufacturer"].astype(str).to_numpy(),
        "pred": np.asarray(pred_bmd, float),
        "true": table["bmd"].to_numpy(float),
        "level": table["level_idx"].to_numpy(int),
        "sex": table["sex"].fillna("").astype(str).to_numpy() if "sex" in table else "",
    })
    rows = []
    for (study, device), g in df.groupby(["study", "device"], sort=False):
        g = g[np.isfinite(g["true"].to_numpy(float))]  # the prediction over the levels its DXA value covers
        p, t = bmdlib.patient_bmd(g["pred"]), bmdlib.patient_bmd(g["true"])
        if np.isnan(t) or bmdlib.normalise_manufacturer(device) is None:
            continue
        rows.append({"study": study, "device": device, "pred": p, "true": t,
                     "t_pred": _region_t(p, g, "pred", device), "t_true": _region_t(t, g, "true", device)})
    out = pd.DataFrame(rows, columns=["study", "device", "pred", "true", "t_pred", "t_true"])
    out["cat_pred"] = bmdlib.reported_category(out["t_pred"].to_numpy(float)) if len(out) else []
    out["cat_true"] = bmdlib.reported_category(out["t_true"].to_numpy(float)) if len(out) else []
    return out


def _agreement(prefix: str, pred: np.ndarray, truth: np.ndarray, devices: np.ndarray) -> dict[str, float]:
    """Bland-Altman bias and 95 % limits of agreement, overall and per DXA manufacturer."""
    res: dict[str, float] = {}
    res[f"{prefix}bias_bmd"], res[f"{prefix}loa_low_bmd"], res[f"{prefix}loa_high_bmd"] = bland_altman(pred, truth)
    for dev in np.unique(devices):
        sel = devices == dev
        res[f"{prefix}bias_bmd_{dev}"], res[f"{prefix}loa_low_bmd_{dev}"], res[f"{prefix}loa_high_bmd_{dev}"] = \
            bland_altman(pred[sel], truth[sel])
    return res


def patient_metrics(pred_bmd: np.ndarray, table: pd.DataFrame) -> dict[str, float]:
    """The primary endpoints on the patients of labeled rows ``table`` (see the module docstring); NaN
    (same keys) when no patient has two evaluable levels."""
    pat = patient_level(pred_bmd, table)
    res: dict[str, float] = {"patient_n": float(len(pat))}
    true_cat, pred_cat = pat["cat_true"].to_numpy(int), pat["cat_pred"].to_numpy(int)
    pred, truth = pat["pred"].to_numpy(float), pat["true"].to_numpy(float)
    res["patient_auc_t"] = auc(true_cat == OSTEOPOROSIS, -pat["t_pred"].to_numpy(float))
    res.update(_classification("patient_", true_cat, pred_cat))
    res["patient_mae_bmd"] = float(np.mean(np.abs(pred - truth))) if len(pat) else NAN
    res["patient_r_bmd"] = pearson_r(pred, truth)
    res.update(_agreement("patient_", pred, truth, pat["device"].astype(str).to_numpy()))
    return res


def on_row_devices(pred: dict[str, np.ndarray], table: pd.DataFrame, manufacturer: str) -> dict[str, np.ndarray]:
    """Predictions with each labeled row's device BMD, T-score and category on the device that measured it.

    The model predicts BMD on the site's device (``manufacturer``: its calibration head). A row measured on
    another device is compared on that device's scale through the predicted sBMD (inverse Hui 1997), all the
    model knows of that device; comparing it with the site device's BMD would count the devices' offset
    (~0.1 g/cm^2 between Hologic and GE Lunar) as error. Applying it twice changes nothing.
    """
    devices = table["dxa_manufacturer"].astype(str).to_numpy()
    other = (devices != manufacturer) & np.isfinite(table["bmd"].to_numpy(float))
    known = [d for d in np.unique(devices[other]) if bmdlib.normalise_manufacturer(d) == d]
    if not known:
        return pred
    out = {k: np.array(pred[k], copy=True) for k in ("bmd", "t", "category")}
    for dev in known:
        sel = other & (devices == dev)
        out["bmd"][sel] = bmdlib.from_sbmd(pred["sbmd"][sel], dev)
        out["t"][sel], out["category"][sel] = t_and_category(out["bmd"][sel], dev, table[sel])
    return {**pred, **out}


def compute_metrics(pred: dict[str, np.ndarray], table: pd.DataFrame, manufacturer: str | None = None) -> dict[str, float]:
    """Aggregate metrics of predictions (training.predict) against the cache rows they came from:
    patient-level endpoints first, then the per-vertebra ones.

    Only labeled rows count. ``manufacturer``: the site's device, the one the predictions are on; rows
    measured on another device are compared on theirs (:func:`on_row_devices`). None: ``pred`` is already
    on each row's device (rows pooled over sites).
    """
    if manufacturer is not None:
        pred = on_row_devices(pred, table, manufacturer)
    labeled = np.isfinite(table["bmd"].to_numpy(float))
    t = table.loc[labeled]
    n = int(labeled.sum())
    res: dict[str, float] = {"num_examples": float(n)}
    if n == 0:
        return res
    p = pred["p"][labeled]
    true_cat = t["category"].to_numpy(int)
    sbmd_p, bmd_p = pred["sbmd"][labeled], pred["bmd"][labeled]
    sbmd_t, bmd_t = t["sbmd"].to_numpy(float), t["bmd"].to_numpy(float)
    res.update(patient_metrics(bmd_p, t))
    osteo = true_cat == OSTEOPOROSIS
    res["auc"] = auc(osteo, p[:, OSTEOPOROSIS])
    res["auc_t"] = auc(osteo, -pred["t"][labeled])
    res.update(_classification("", true_cat, pred["category"][labeled]))
    res["acc3_head"] = float(np.mean(p.argmax(1) == true_cat))
    res["mae_sbmd"] = float(np.mean(np.abs(sbmd_p - sbmd_t)))
    res["r_sbmd"] = pearson_r(sbmd_p, sbmd_t)
    res["mae_bmd"] = float(np.mean(np.abs(bmd_p - bmd_t)))
    res["r_bmd"] = pearson_r(bmd_p, bmd_t)
    if "level_pred" in pred:
        res["level_acc"] = float(np.mean(pred["level_pred"][labeled] == t["level_idx"].to_numpy(int)))
    res.update(_agreement("", bmd_p, bmd_t, t["dxa_manufacturer"].astype(str).to_numpy()))
    return res
