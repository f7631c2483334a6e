"""What a trained method's site-local parts do (issue 10 item 5), next to what the simulation put there.

Measured on a site's test vertebrae with the model the site selected: the gate's mean weight on the
local expert, and in g/cm^2 of device BMD the mean change made by the calibration head's learned residual
(predicted device BMD minus the inverse Hui 1997 of the predicted sBMD) and by the local expert (device
BMD with it minus without it: the model's ``local_shift`` minus that residual). The synthetic truth says
what there was to learn: the site's simulated DXA device bias (profile ``dxa_bias`` x the true device BMD)
and everything its DXA adds to the truth (bias, drift, degeneration, calcification, the patients' own
errors).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from osteo_model import bmd as bmdlib
from osteo_model.model import unwrap

DIAGNOSTICS = ("gate_local", "calibration_shift", "local_expert_shift")
REFIT = "refit_epoch"
"""A method's diagnostic beside DIAGNOSTICS where it ran a final local refit (training.final_refit): the
refit epoch kept (0: none beat the selected round)."""
SIMULATED = ("device_bias_rel", "device_bias", "dxa_minus_truth")


def diagnose(model: torch.nn.Module, pred: dict[str, np.ndarray]) -> dict[str, float]:
    """DIAGNOSTICS of ``model`` from its predictions ``pred`` on a site's rows (training.predict, which
    carries what the local parts add: the model's ``local_shift``); the MoE entries only for a model with a
    gate. Empty when there are no rows."""
    if not len(pred["bmd"]):
        return {}
    net = unwrap(model)
    residual = pred["bmd"] - bmdlib.from_sbmd(pred["sbmd"], net.manufacturer)
    out = {"calibration_shift": float(np.mean(residual))}
    if net.moe:
        out["gate_local"] = float(np.mean(pred["gate"][:, -1]))
        out["local_expert_shift"] = float(np.mean(pred["local_shift"] - residual))
    return out


def simulated_dxa_bias(truth_dir: Path, sites: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per site, from osteo-synth's truth (``sites.json`` profiles, ``<site>.csv`` per vertebra): the
    profile's relative device bias, that bias in g/cm^2 (x the mean true device BMD of the DXA-measured
    vertebrae) and the mean DXA minus true device BMD. Sites without truth (real or fake caches) are left out."""
    index = truth_dir / "sites.json"
    if not index.is_file():
        return {}
    profiles = json.loads(index.read_text(encoding="utf-8"))["sites"]
    out = {}
    for site in sites:
        table = truth_dir / f"{site}.csv"
        if site not in profiles or not table.is_file():
            continue
        vert = pd.read_csv(table)
        measured = vert[np.isfinite(vert["dxa_bmd"].to_numpy(float))]
        if measured.empty:
            continue
        rel = float(profiles[site]["profile"]["dxa_bias"])
        truth = measured["true_bmd_device"].to_numpy(float)
        out[site] = {"device_bias_rel": rel, "device_bias": rel * float(np.mean(truth)),
                     "dxa_minus_truth": float(np.mean(measured["dxa_bmd"].to_numpy(float) - truth))}
    return out
