"""The evidence benchmark's onboarding curve (issue 10 item 3): a site that took no part in training joins.

Its model is the federation's last global payload (shared parts) with fresh local parts; ``fit_local``
fits only its local expert and calibration on k of its labeled training patients (nested draws: the k=5
patients include the k=2 ones), for each requested k capped at the patients it has, and keeps the
shared-only local parts unless a fitted epoch predicts the site's own validation patients better (so
onboarding cannot make the site worse on its own validation split). Selection uses the site's whole
validation split, whatever k: k counts the training patients only. Every point is judged on the site's
test patients; "shared_only" is k = 0.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Mapping, Sequence

import numpy as np

from osteo_model import model as osteo, training
from osteo_model.dataset import SiteData
from osteo_model.errors import ConfigError
from osteofl.simulation.evidence_methods import MethodRun, site_outcome

SHARED_ONLY = "shared_only"
SELECTED = f"val_{training.SELECTION_METRIC}_selected"
BASELINE = f"val_{training.SELECTION_METRIC}_shared_only"


def labeled_counts(requested: Sequence[int], available: int) -> list[int]:
    """The k to fit: each requested k capped at the ``available`` labeled training patients, once each."""
    return sorted({min(int(k), int(available)) for k in requested} - {0})


ALL = "all"
"""The point that fits every labeled training patient the site has: a requested k at or above that count,
whose number differs between seeds (their splits differ), is one point of the curve, not one per seed."""


def point_name(k: int, available: int) -> str:
    return SHARED_ONLY if k == 0 else ALL if k >= available else f"k{k}"


def _shared_only_model(cfg, data: SiteData, payload: Mapping[str, np.ndarray]) -> osteo.OsteoNet:
    model = osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer)
    osteo.standardise_on_site(model, data)
    keys = osteo.shared_keys(model)
    missing = [k for k in keys if k not in payload]
    if missing:  # e.g. FedPer keeps its heads at the sites: no global model to onboard onto
        raise ConfigError(None, f"onboarding: the method's global payload lacks shared parts {missing[:3]}")
    osteo.load_shared(model, {k: payload[k] for k in keys})
    return model


def curve(cfg, data: SiteData, payload: Mapping[str, np.ndarray], requested: Sequence[int], device: str) -> MethodRun:
    """Test predictions per point (``predictions[point_name(k)]``) with, per point, the labeled patients
    used, fit_local's selected epoch (0 = shared-only kept), its validation scores and the diagnostics of
    the onboarded local parts (``diagnostics[point]``)."""
    base = _shared_only_model(cfg, data, payload)
    rows = data.splits["train"]
    patients = data.cache.table["patient_id"].astype(str).to_numpy()[rows]
    order = np.random.default_rng(int(cfg.seed)).permutation(np.unique(patients))
    run = MethodRun({})
    run.predictions[SHARED_ONLY], diag = site_outcome(base, data, cfg, device)
    run.diagnostics[SHARED_ONLY] = {"labeled_patients": 0.0, **diag}
    for k in labeled_counts(requested, len(order)):
        model = copy.deepcopy(base)
        few = dataclasses.replace(data, splits={**data.splits, "train": rows[np.isin(patients, order[:k])]})
        fit = training.fit_local(model, few, cfg, device, int(cfg.train.fit_local_epochs))
        run.predictions[point_name(k, len(order))], diag = site_outcome(model, data, cfg, device)
        run.diagnostics[point_name(k, len(order))] = {"labeled_patients": float(k), "selected_epoch": fit["selected_epoch"],
                                          SELECTED: fit[SELECTED], BASELINE: fit[BASELINE], **diag}
    return run
