"""Loss terms. Every term is a mean of per-sample terms when ``per_sample`` is asked for, which DP-SGD
needs (a term that mixes samples of a batch would leak one sample into another's clipped gradient)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from osteo_model.model import SBMD_SCALE


def ssl_loss(pred: torch.Tensor, target_std: torch.Tensor) -> torch.Tensor:
    """Regression of the standardised radiomic feature vector (smooth L1: robust to outlier features)."""
    return F.smooth_l1_loss(pred, target_std)


def consistency_loss(pred_a: torch.Tensor, pred_b: torch.Tensor) -> torch.Tensor:
    """Two texture-safe views of a crop should predict the same texture features."""
    return F.mse_loss(pred_a, pred_b)


def balance_loss(gate: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Keeps all experts in use; 0 when perfectly balanced.

    Batch form: log(E) - entropy of the batch-mean gate (penalises collapse onto few experts while
    letting single samples specialise). Per-sample form (DP): mean KL(uniform || gate_i), which stops
    collapse without coupling samples.
    """
    n = gate.shape[1]
    if n < 2:
        return gate.new_zeros(())
    eps = 1e-8
    if per_sample:
        return (-math.log(n) - torch.log(gate + eps).mean(1)).mean()
    mean = gate.mean(0)
    return math.log(n) + (mean * torch.log(mean + eps)).sum()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the rows ``mask`` keeps (0 with none); NaN in a masked-out row never leaks."""
    w = mask.float()
    return (torch.nan_to_num(values) * w).sum() / w.sum().clamp(min=1.0)


def task_losses(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sBMD regression, device-BMD calibration (both in units of SBMD_SCALE), 3-class diagnosis, level.

    Each term counts the rows that have its target: a row measured on another DXA device than the site's
    has an sBMD and a category but no device-BMD target (dataset.CropDataset's ``device``).
    """
    sbmd = _masked_mean(((out["sbmd"] - batch["sbmd"]) / SBMD_SCALE) ** 2, torch.isfinite(batch["sbmd"]))
    calib = _masked_mean(((out["bmd"] - batch["bmd"]) / SBMD_SCALE) ** 2, torch.isfinite(batch["bmd"]))
    has_cat = batch["category"] >= 0
    diag = _masked_mean(F.cross_entropy(out["diagnosis"], batch["category"].clamp(min=0), reduction="none"), has_cat)
    level = F.cross_entropy(out["level"], batch["level"])
    return {"sbmd": sbmd, "calib": calib, "diag": diag, "level": level}


def local_prior_loss(out: dict[str, torch.Tensor], labeled_patients: int) -> torch.Tensor:
    """Gaussian prior that the site-local parts add nothing to the device BMD, divided by the site's labeled
    training patients: with weight k (``train.loss.local_prior``) it is worth k patients of evidence, so a
    site with many labels keeps its own correction and one with a handful is shrunk towards the shared
    model (k = residual variance / variance of true site offsets; in units of SBMD_SCALE as calib)."""
    return ((out["local_shift"] / SBMD_SCALE) ** 2).mean() / max(int(labeled_patients), 1)
