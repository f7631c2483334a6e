"""The methods of the evidence benchmark, each giving per-patient test predictions per site.

Federated methods run in process, round for round what a Flower run does, without Flower's processes
(they cost more than the training on a small machine and add nothing to what is compared): each site
loads the global payload (``osteofl.protocol.payload_keys``/``load_payload``: which arrays travel is the
same code as a deployment's), trains with the one recipe (``training.Recipe``; a fresh optimiser per
round restored from the site's saved state, as the ClientApp does; FedProx's term via
``osteo_model.proximal``), and the payloads are averaged weighted by each site's pool size (FedAvg's n_k).
Not modelled: the server's robust clipping of honest sites' updates (server/robust.py) and DP.

Model selection, the same for every trained method: after each task-phase round each site judges the
model it would use (global shared parts + its own local parts) on its own validation patients
(``training.SELECTION_METRIC``) and keeps the best round; the test split is predicted once, with it.
Each round's score and the round kept go with the run, so a best round at the very end shows.
The L1-HU rule and radiomics+linear have nothing to select (a fixed rule; a closed-form fit), nor has
the bone oracle, a reference that reads the synthetic truth (the floor no CT model can pass).
With its predictions each trained method reports what its site-local parts do at each site
(simulation/evidence_diagnostics.py), and a federation the last round's global payload (what a new site
is onboarded onto, simulation/evidence_onboarding.py).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from osteo_model import baselines, checkpoints, metrics, model as osteo, proximal, training
from osteo_model.dataset import SiteData
from osteo_model.errors import ConfigError
from osteo_model.evidence import Patients
from osteofl import protocol
from osteofl.simulation.evidence_diagnostics import REFIT, diagnose

Predictions = dict[str, Patients]


@dataclass
class MethodRun:
    """One method in one scenario and seed: per-site test predictions, each round's wall time, per-site
    diagnostics of its trained parts (evidence_diagnostics.DIAGNOSTICS), for a federation the last
    round's global payload and, for a trained method, its model selection per site: the validation score
    after each task-phase round (NaN where none) and the task round kept (1-based; 0: none could be
    judged, the last model was kept), so that a best round at the end (not shown converged) is visible."""

    predictions: Predictions
    round_seconds: list[float] = field(default_factory=list)
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)
    payload: dict[str, np.ndarray] = field(default_factory=dict)
    val_history: dict[str, list[float]] = field(default_factory=dict)
    selected_round: dict[str, int] = field(default_factory=dict)


Engine = Callable[[DictConfig, Mapping[str, SiteData], str], MethodRun]


def _test(data: SiteData) -> tuple[np.ndarray, pd.DataFrame]:
    rows = data.splits["test"]
    return rows, data.cache.table.iloc[rows]


def patients_from_bmd(pred_bmd: np.ndarray, table: pd.DataFrame) -> Patients:
    """Per-vertebra device BMD -> the patient-level record (L1-L4 rule, T-score, WHO category)."""
    return _patients(metrics.patient_level(pred_bmd, table))


def _patients(pat: pd.DataFrame) -> Patients:
    """metrics.patient_level's frame as the benchmark's record (score: minus the predicted T-score)."""
    return Patients(device=pat["device"].to_numpy(str), true_bmd=pat["true"].to_numpy(float),
                    pred_bmd=pat["pred"].to_numpy(float), true_cat=pat["cat_true"].to_numpy(int),
                    pred_cat=pat["cat_pred"].to_numpy(int), score=-pat["t_pred"].to_numpy(float))


def site_outcome(model: torch.nn.Module, data: SiteData, cfg, device: str) -> tuple[Patients, dict[str, float]]:
    """The site's test patients as ``model`` predicts them, and what its local parts do there."""
    rows, table = _test(data)
    batch = int(cfg.train.eval_batch_size)
    pred = training.predict(model, data, rows, device, batch)  # on the site's device, as diagnose reads it
    on_rows = metrics.on_row_devices(pred, table, data.manufacturer)
    return patients_from_bmd(on_rows["bmd"], table), diagnose(model, pred)


class Selector:
    """Per site, the task-phase round whose model predicts the site's own validation patients best."""

    def __init__(self, sites: list[str]) -> None:
        self.best: dict[str, tuple[float, dict | None]] = {s: (float("inf"), None) for s in sites}
        self.history: dict[str, list[float]] = {s: [] for s in sites}
        self.selected: dict[str, int] = {s: 0 for s in sites}

    def update(self, models: Mapping[str, torch.nn.Module], datas: Mapping[str, SiteData], cfg, device: str) -> None:
        for site, model in models.items():
            score = float(training.evaluate(model, datas[site], cfg, "val", device).get(training.SELECTION_METRIC, np.nan))
            self.history[site].append(score)
            if checkpoints.improves(score, self.best[site][0]):
                self.best[site] = (score, copy.deepcopy(model.state_dict()))
                self.selected[site] = len(self.history[site])

    def outcome(self, models: Mapping[str, torch.nn.Module], datas: Mapping[str, SiteData], cfg, device: str,
                round_seconds: list[float]) -> MethodRun:
        """Test predictions and diagnostics of each site's selected model (the last one where nothing was
        judged), after its final local refit where ``train.final_refit_epochs`` asks for one (diagnostic
        ``refit_epoch``: the epoch kept, 0 = none beat the selected model). One site after another: central
        models share modules, so each site's selected state is loaded just before."""
        run = MethodRun({}, round_seconds, val_history=self.history, selected_round=self.selected)
        for site, model in models.items():
            refit_epoch = self.kept(site, model, datas[site], cfg, device)
            run.predictions[site], run.diagnostics[site] = site_outcome(model, datas[site], cfg, device)
            if refit_epoch is not None:
                run.diagnostics[site][REFIT] = refit_epoch
        return run

    def kept(self, site: str, model: torch.nn.Module, data: SiteData, cfg, device: str) -> float | None:
        """Put into ``model`` what ``site`` goes home with, as a deployed site does: its selected state,
        after the final local refit where ``train.final_refit_epochs`` asks for one. Returns the refit
        epoch kept (0: none beat the selected state; None: no refit)."""
        if (state := self.best[site][1]) is not None:  # where nothing was judged, the model as it is
            model.load_state_dict(state)
        return training.final_refit(model, data, cfg, device)


def _site_models(cfg, datas: Mapping[str, SiteData], device: str) -> dict[str, torch.nn.Module]:
    """One model per site on ``device``, all from the same seeded initial weights (the run's global model);
    on the device before any optimiser or FedProx anchor is made from them."""
    n_features = next(iter(datas.values())).cache.features.shape[1]
    models = {}
    for site, data in datas.items():
        torch.manual_seed(int(cfg.seed))
        models[site] = osteo.build_model(cfg, n_features, data.manufacturer)
        osteo.standardise_on_site(models[site], data)
        models[site].to(device)
    return models


def fedavg(updates: list[tuple[Mapping[str, torch.Tensor], int]]) -> dict[str, np.ndarray]:
    """Weighted mean of the sites' payloads (weights: pool sizes), each array back in its own dtype."""
    total = float(sum(n for _, n in updates))
    weights = [n / total if total else 1.0 / len(updates) for _, n in updates]
    out = {}
    for key, first in updates[0][0].items():
        mean = sum(w * u[key].detach().cpu().double() for w, (u, _) in zip(weights, updates))
        out[key] = (mean.round() if not first.is_floating_point() else mean).to(first.dtype).numpy()
    return out


def _rounds(cfg) -> list[tuple[int, str]]:
    total = int(cfg.federation.ssl_rounds) + int(cfg.federation.task_rounds)
    return [(rnd, protocol.phase_of(rnd, cfg)) for rnd in range(1, total + 1)]


def _max_steps(cfg) -> int | None:
    return None if cfg.federation.local_steps is None else int(cfg.federation.local_steps)


def federated(cfg, datas: Mapping[str, SiteData], device: str, aggregate: bool = True) -> MethodRun:
    """FedAvg of ``payload_keys`` (OsteoFL's shared parts, the whole model with ``federation.share_all``,
    FedPer with ``federation.personal_prefixes``; FedProx with ``federation.strategy=fedprox``);
    ``aggregate=False``: local-only, the same rounds and steps with nothing averaged."""
    models = _site_models(cfg, datas, device)
    lengths = training.phase_lengths(cfg, federated=True)
    mu = float(cfg.federation.strategy_args.fedprox.proximal_mu) if cfg.federation.strategy == "fedprox" else 0.0
    keys = protocol.payload_keys(next(iter(models.values())), cfg) if aggregate else []
    glob = fedavg([({k: m.state_dict()[k] for k in keys}, 1) for m in models.values()]) if keys else {}
    opt: dict[str, dict | None] = {s: None for s in models}
    selector, seconds = Selector(list(models)), []
    for rnd, phase in _rounds(cfg):
        t0, updates = time.perf_counter(), []
        for site, model in models.items():
            if keys:
                protocol.load_payload(model, cfg, glob)
            recipe = training.Recipe({site: model}, cfg, lengths, {site: datas[site]})
            recipe.restore(opt[site])
            recipe.begin(phase, training.index_in_phase(cfg, phase, rnd))
            proximal.attach_proximal_term(recipe.optimizer, model, mu)
            training.train_steps(model, datas[site], cfg, phase, recipe.optimizer, device, max_steps=_max_steps(cfg),
                                 pass_index=rnd)
            opt[site] = recipe.optimizer.state_dict()
            state = model.state_dict()
            updates.append(({k: state[k] for k in keys}, len(training.phase_rows(datas[site], phase))))
        if keys:
            glob = fedavg(updates)
            for model in models.values():
                protocol.load_payload(model, cfg, glob)
        if phase == "task":
            selector.update(models, datas, cfg, device)
        seconds.append(time.perf_counter() - t0)
    run = selector.outcome(models, datas, cfg, device, seconds)
    run.payload = glob
    return run


def local_only(cfg, datas: Mapping[str, SiteData], device: str) -> MethodRun:
    return federated(cfg, datas, device, aggregate=False)


def central(cfg, datas: Mapping[str, SiteData], device: str) -> MethodRun:
    """All sites' data in one place: one set of shared modules, each site's own local parts, trained round
    for round with the federation's local steps per site, no averaging (as osteo-sim's centralised)."""
    n_features = next(iter(datas.values())).cache.features.shape[1]
    torch.manual_seed(int(cfg.seed))
    models = osteo.build_site_models(cfg, n_features, {s: d.manufacturer for s, d in datas.items()})
    for model in models.values():
        model.to(device)
    for site, model in models.items():
        osteo.standardise_on_site(model, datas[site])
    recipe = training.Recipe(models, cfg, training.phase_lengths(cfg, federated=True), datas)
    selector, seconds = Selector(list(models)), []
    for rnd, phase in _rounds(cfg):
        t0 = time.perf_counter()
        recipe.begin(phase, training.index_in_phase(cfg, phase, rnd))
        for site, model in models.items():
            training.train_steps(model, datas[site], cfg, phase, recipe.optimizer, device, max_steps=_max_steps(cfg),
                                 pass_index=rnd)
        if phase == "task":
            selector.update(models, datas, cfg, device)
        seconds.append(time.perf_counter() - t0)
    return selector.outcome(models, datas, cfg, device, seconds)


def hu_rule(cfg, datas: Mapping[str, SiteData], device: str) -> MethodRun:
    """The L1 trabecular-HU rule per patient (score -HU, Pickhardt 2013 categories); where L1 is not
    evaluable the next level down stands in. It predicts no BMD (BMD metrics are left empty)."""
    out = {}
    for site, data in datas.items():
        rows, table = _test(data)
        pat = metrics.patient_level(np.full(len(rows), np.nan), table)
        hu = baselines.patient_hu(table, pat["study"])
        out[site] = replace(_patients(pat), pred_cat=baselines.hu_category(hu), score=-hu)
    return MethodRun(out)


def radiomics_linear(cfg, datas: Mapping[str, SiteData], device: str) -> MethodRun:
    """Ridge regression of sBMD on the radiomic features, fit on the pooled training splits."""
    fit = baselines.RadiomicsLinear().fit(datas)
    out = {}
    for site, data in datas.items():
        table = _test(data)[1]
        out[site] = patients_from_bmd(metrics.on_row_devices(fit.predict(data, "test"), table, data.manufacturer)["bmd"], table)
    return MethodRun(out)


def _truth(truth_dir: Path, site: str, table: pd.DataFrame) -> pd.DataFrame:
    """The synthetic truth's device BMD and age of each of ``table``'s vertebrae (osteo-synth's ``<site>.csv``)."""
    path = truth_dir / f"{site}.csv"
    if not path.is_file():
        raise ConfigError(path, "no synthetic truth for this site: the bone oracle needs osteo-synth's sites")
    needed = ["study_id", "level", "true_bmd_device", "age"]
    truth = pd.read_csv(path)
    if missing := [c for c in needed if c not in truth.columns]:
        raise ConfigError(path, f"no column {', '.join(missing)}: not osteo-synth's truth (or an older one)")
    truth = truth[needed].set_index(["study_id", "level"])
    keys = pd.MultiIndex.from_arrays([table["study_id"].astype(str), table["level"].astype(str)])
    out = truth.reindex(keys)
    absent = int((~np.isfinite(out.to_numpy(float)).all(axis=1)).sum())
    if absent:
        raise ConfigError(path, f"{absent} of the site's {len(out)} vertebrae have no true_bmd_device or age: "
                                "the truth was not written with these caches")
    return out


def bone_oracle(cfg, datas: Mapping[str, SiteData], device: str) -> MethodRun:
    """A reference, not a method: what a CT reader that knew every vertebra's true bone exactly, and the
    patient's age, would predict: the truth's device BMD times the site's DXA-over-truth ratio as a
    straight line in age (least squares over the site's training and validation vertebrae: its device
    bias, drift and average degenerative and aortic gain, which grow with age). What it misses, no CT model
    can learn from these sites' CTs but for a little: each patient's own DXA error, degeneration beyond
    what age predicts, and DXA precision (the aortic plaques, ~0.6 % of a DXA reading each, are drawn in
    the CT and a model could see some of them). Its MAE estimates the floor of every method's, so a goal
    at or below it is out of reach on these patients. Synthetic sites only (``paths.ground_truth``)."""
    out = {}
    for site, data in datas.items():
        table = data.cache.table
        truth = _truth(Path(cfg.paths.ground_truth), site, table)
        true, age = truth["true_bmd_device"].to_numpy(float), truth["age"].to_numpy(float)
        fit = np.concatenate([data.splits["train"], data.splits["val"]])
        ratio = table["bmd"].to_numpy(float) / true
        fit = fit[np.isfinite(ratio[fit])]
        if not len(fit):
            raise ConfigError(Path(cfg.paths.cache_root) / site, "no training or validation vertebra has a DXA "
                              "BMD: the bone oracle cannot fit this site's DXA factor")
        line = np.linalg.lstsq(np.stack([np.ones(len(fit)), age[fit]], 1), ratio[fit], rcond=None)[0]
        rows = data.splits["test"]
        out[site] = patients_from_bmd((line[0] + line[1] * age[rows]) * true[rows], table.iloc[rows])
    return MethodRun(out)


ENGINES: dict[str, Engine] = {"federated": federated, "local": local_only, "central": central,
                              "hu_rule": hu_rule, "radiomics_linear": radiomics_linear, "bone_oracle": bone_oracle}
READS_TRUTH = frozenset({"bone_oracle"})
"""Engines that read the synthetic truth (``paths.ground_truth``) besides the site caches: their runs are
keyed by its content too, since ``paths`` is not part of a run's key (simulation/evidence.py)."""
