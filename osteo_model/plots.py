"""Evaluation figures (matplotlib, Agg backend: no display needed). Aggregate views only."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from osteo_model.metrics import auc, bland_altman  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def roc_png(path: str | Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Path:
    """ROC curves of osteoporosis vs not; ``curves``: name -> (is_osteoporosis, score)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (y, s) in curves.items():
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="chance")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, Path(path))


def scatter_png(path: str | Path, pred: np.ndarray, truth: np.ndarray, devices: np.ndarray, title: str) -> Path:
    """Predicted vs DXA device BMD, coloured by DXA manufacturer."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for dev in np.unique(devices):
        sel = devices == dev
        ax.scatter(truth[sel], pred[sel], s=8, alpha=0.6, label=dev)
    lo, hi = np.nanmin([truth.min(), pred.min()]), np.nanmax([truth.max(), pred.max()])
    ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
    ax.set(xlabel="DXA BMD (g/cm²)", ylabel="predicted BMD (g/cm²)", title=title)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def bland_altman_png(path: str | Path, pred: np.ndarray, truth: np.ndarray, devices: np.ndarray, title: str) -> Path:
    """Bland-Altman plot of device BMD with bias and 95 % limits of agreement per DXA manufacturer."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for i, dev in enumerate(np.unique(devices)):
        sel = devices == dev
        mean, diff = (pred[sel] + truth[sel]) / 2, pred[sel] - truth[sel]
        bias, lo, hi = bland_altman(pred[sel], truth[sel])
        line = ax.scatter(mean, diff, s=8, alpha=0.6, label=f"{dev}: bias {bias:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        colour = line.get_facecolor()[0]
        ax.axhline(bias, color=colour, lw=1)
        for limit in (lo, hi):
            ax.axhline(limit, color=colour, lw=0.8, ls="--")
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="mean of predicted and DXA BMD (g/cm²)", ylabel="predicted - DXA (g/cm²)", title=title)
    ax.legend(fontsize=7)
    return _save(fig, Path(path))
