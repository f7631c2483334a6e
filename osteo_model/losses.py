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


def task_losses(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sBMD regression, device-BMD calibration (both in units of SBMD_SCALE), 3-class diagnosis, level."""
    sbmd_err = (out["sbmd"] - batch["sbmd"]) / SBMD_SCALE
    bmd_err = (out["bmd"] - batch["bmd"]) / SBMD_SCALE
    valid = torch.isfinite(batch["sbmd"]) & torch.isfinite(batch["bmd"])
    w = valid.float()
    denom = w.sum().clamp(min=1.0)
    sbmd = (torch.nan_to_num(sbmd_err) ** 2 * w).sum() / denom
    calib = (torch.nan_to_num(bmd_err) ** 2 * w).sum() / denom
    has_cat = batch["category"] >= 0
    diag = F.cross_entropy(out["diagnosis"], batch["category"].clamp(min=0), reduction="none")
    diag = (diag * has_cat.float()).sum() / has_cat.float().sum().clamp(min=1.0)
    level = F.cross_entropy(out["level"], batch["level"])
    return {"sbmd": sbmd, "calib": calib, "diag": diag, "level": level}
