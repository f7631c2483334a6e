"""Training engine shared by central training (osteo-train) and the federated client.

Phase "ssl": predict each crop's standardised radiomic texture vector (plus vertebra level, which every
crop has, and an optional augmentation-consistency term) on all of a site's crops.
Phase "task": sBMD regression, device-BMD calibration, 3-class diagnosis, level, and MoE load balancing
on the labeled training split.
"""
from __future__ import annotations

import copy
import hashlib
import math
from collections import defaultdict
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from osteo_model import losses, metrics
from osteo_model.calibration import t_and_category
from osteo_model.checkpoints import improves
from osteo_model.dataset import CropDataset, OneRowPerPatient, SiteData
from osteo_model.model import local_parameters, set_sbmd_prior, shared_parameters, unwrap

PHASES = ("ssl", "task")


def make_optimizer(params: Iterable[nn.Parameter] | Iterable[dict], cfg, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW at ``train.lr`` x ``lr_scale`` (params may be torch parameter groups with their own lr)."""
    return torch.optim.AdamW(list(params), lr=float(cfg.train.lr) * lr_scale, weight_decay=float(cfg.train.weight_decay))


def phase_lengths(cfg, federated: bool) -> dict[str, int]:
    """Length of each phase in schedule steps: epochs in central training, rounds in a federation (and in
    the simulation baselines, which train round for round like it)."""
    if federated:
        return {"ssl": int(cfg.federation.ssl_rounds), "task": int(cfg.federation.task_rounds)}
    return {"ssl": int(cfg.train.ssl_epochs), "task": int(cfg.train.task_epochs)}


def index_in_phase(cfg, phase: str, rnd: int) -> int:
    """0-based position of federated round ``rnd`` (1-based) within its phase."""
    return int(rnd) - 1 - (int(cfg.federation.ssl_rounds) if phase == "task" else 0)


def cosine_factor(index: int, length: int) -> float:
    """Cosine decay over a phase: 1 at its first step, falling towards 0 at its end. Without it the last
    epoch's (round's) weights land at a random point of Adam's oscillation and carry a systematic offset
    of a few hundredths of g/cm^2."""
    return 0.5 * (1 + math.cos(math.pi * min(max(int(index), 0), int(length)) / max(int(length), 1)))


def mean_train_sbmd(datas: Iterable[SiteData]) -> float:
    """Mean sBMD of the pooled labeled training rows (the sBMD head's prior); NaN when there are none."""
    values = np.concatenate([[]] + [d.cache.table["sbmd"].to_numpy(float)[d.splits["train"]] for d in datas])
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


class Recipe:
    """The one training recipe of central training, the federated client and the simulation baselines.

    - optimiser: AdamW with one group of shared parameters (taken once: ``models`` built by
      model.build_site_models share them) at ``train.lr`` and one group per model of its local parameters
      (device expert, calibration) at ``train.local_lr_factor`` times that: they see only their own site's
      batches, and a calibration offset of a few hundredths of g/cm^2 should be learned within a few epochs;
    - schedule: cosine decay over each phase (``lengths``: steps per phase, see phase_lengths);
    - priors: at the first step of the task phase the sBMD head starts at the mean training sBMD of
      ``datas`` (pooled in central training; a site's own in a federation, where FedAvg's n-weighted mean
      of the sites' priors is the pooled one), unless ``priors`` is false (onboarding keeps the shared head);
    - personalisation: the last ``train.personalise_steps`` steps of the task phase train only the local
      parts (shared learning rate 0) on a cosine of their own, so they fit the final shared model rather
      than one that is still moving (``personalise`` false: onboarding, where only local parts train anyway).
    Call ``begin(phase, index)`` before each epoch/round; ``restore`` an optimizer state saved earlier.
    """

    def __init__(self, models: Mapping[str, nn.Module], cfg, lengths: Mapping[str, int],
                 datas: Mapping[str, SiteData] | None = None, priors: bool = True, personalise: bool = True,
                 shared_lr_factor: float = 1.0) -> None:
        self.cfg, self.lengths, self.models, self.datas, self.priors = cfg, dict(lengths), dict(models), datas, priors
        self.shared_lr_factor = float(shared_lr_factor)
        for site, data in (datas or {}).items():
            if site in self.models:  # the local prior's strength: the labeled patients the site's model learns from
                unwrap(self.models[site]).labeled_patients = data.patients("train")
        self.tail = int(cfg.train.get("personalise_steps", 0) or 0) if personalise else 0
        if self.tail and self.tail >= self.lengths.get("task", 0):
            raise ValueError(f"train.personalise_steps={self.tail} must be fewer than the task phase's "
                             f"{self.lengths.get('task', 0)} steps")
        first = next(iter(self.models.values()))
        groups = [{"params": shared_parameters(first), "role": "shared"}]
        groups += [{"params": local_parameters(m), "role": "local"} for m in self.models.values()]
        self.optimizer = torch.optim.AdamW(groups, lr=float(cfg.train.lr), weight_decay=float(cfg.train.weight_decay))
        self._set_lr(1.0)

    def base_lr(self, role: str) -> float:
        return float(self.cfg.train.lr) * (float(self.cfg.train.local_lr_factor) if role == "local" else self.shared_lr_factor)

    def _set_lr(self, factor: float, shared_factor: float | None = None) -> None:
        for group in self.optimizer.param_groups:
            own = factor if shared_factor is None or group["role"] == "local" else shared_factor
            group["lr"] = self.base_lr(group["role"]) * own

    def restore(self, state: dict | None) -> bool:
        """Load an optimizer state saved by an earlier round/epoch; False (and a fresh optimizer) when it
        does not fit these groups (e.g. saved by an older version with one group)."""
        if state is None:
            return False
        roles = [g["role"] for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(state)
        except ValueError:
            return False
        for group, role in zip(self.optimizer.param_groups, roles):
            group["role"] = role  # the loaded groups replace ours; the roles are ours, not the state's
        return True

    def begin(self, phase: str, index: int) -> None:
        """Set the priors (first task step) and the learning rates of step ``index`` of ``phase``."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, not {phase!r}")
        if self.priors and phase == "task" and index == 0 and self.datas:
            prior = mean_train_sbmd(self.datas.values())
            if np.isfinite(prior):
                set_sbmd_prior(next(iter(self.models.values())), prior)
        length = self.lengths.get(phase, 1)
        if phase != "task" or not self.tail:
            self._set_lr(cosine_factor(index, length))
        elif index < length - self.tail:
            self._set_lr(cosine_factor(index, length - self.tail))
        else:
            self._set_lr(cosine_factor(index - (length - self.tail), self.tail), shared_factor=0.0)


def phase_split(phase: str) -> str:
    """The split a phase trains on: self-supervision on the unlabeled pool, the tasks on labeled training rows."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, not {phase!r}")
    return "unlabeled" if phase == "ssl" else "train"


def phase_rows(data: SiteData, phase: str) -> np.ndarray:
    return data.splits[phase_split(phase)]


def _batch_size(cfg, n_rows: int) -> int:
    return max(1, min(int(cfg.train.batch_size), n_rows))


def phase_dataset(data: SiteData, cfg, phase: str, augment: bool = True,
                  per_patient: bool = False) -> CropDataset | OneRowPerPatient:
    """The phase's rows (all crops for ssl, the labeled training split for task); ``per_patient``: one
    item per patient (DP-SGD's record, dataset.OneRowPerPatient)."""
    ds = CropDataset(data.cache, phase_rows(data, phase), augment=augment, seed=int(cfg.seed), device=data.manufacturer)
    return OneRowPerPatient(ds, seed=int(cfg.seed)) if per_patient else ds


def steps_per_pass(data: SiteData, cfg, phase: str, per_patient: bool = False, salt: str | None = None) -> int:
    """Batches in one pass over the phase's dataset (make_loader's length)."""
    n = len(phase_dataset(data, cfg, phase, per_patient=per_patient))
    return n // _batch_size(cfg, n) if salt is not None else -(-n // _batch_size(cfg, n))


def shuffle_seed(cfg, salt: str | None = None, batch_size: int = 0, pass_index: int = 0) -> int:
    """The seed of the loader's shuffle in pass ``pass_index`` (the round or epoch): the run's ``seed`` and
    the pass, keyed with a site's secret ``salt`` where it has one (a hospital's site, kept in its state:
    client/site_session.py). Each pass draws its own order: with one order for every pass, a round of
    ``local_steps`` shorter than a pass trained on the same first batches every round and never saw the
    rest (and each crop met the same augmentation every time). The run's seed is the coordinator's: from it
    alone the coordinator would know which rows each batch holds, and differencing replies over seeds would
    isolate rows. The salted order is keyed with the batch size too: batches of B and B+1 rows from one
    order share B rows, and the two replies' difference would be one row. Without a salt (central
    training, osteo-sim, osteo-evidence) the order is the seed's and the pass's alone, reproducible by seed."""
    message = f"{int(cfg.seed)}:{int(batch_size) if salt is not None else 0}:{int(pass_index)}".encode()
    key = salt.encode() if salt is not None else b""
    return int.from_bytes(hashlib.blake2b(message, key=key, digest_size=8).digest(), "big")


def make_loader(data: SiteData, cfg, phase: str, shuffle: bool = True, augment: bool = True,
                per_patient: bool = False, salt: str | None = None, pass_index: int = 0) -> DataLoader:
    """Batches of ``phase_dataset``, shuffled in the order of ``shuffle_seed``. With a ``salt`` (a hospital's
    site) every batch is full: a pass's last, partial batch is dropped (its rows come in later passes,
    which draw a new order), since two rounds of k and k+1 steps would otherwise differ by that batch alone,
    as few as one row (the floor on ``train.batch_size``, client/policy.py, bounds full batches only)."""
    ds = phase_dataset(data, cfg, phase, augment=augment, per_patient=per_patient)
    batch = _batch_size(cfg, len(ds))
    return DataLoader(
        ds,
        batch_size=batch,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(shuffle_seed(cfg, salt, batch, pass_index)),
        drop_last=salt is not None,
        num_workers=int(cfg.data.num_workers),
    )


def _second_view(x: torch.Tensor) -> torch.Tensor:
    """Axial 90-degree rotation + flip of the whole batch: a texture-preserving second view."""
    return torch.flip(torch.rot90(x, 1, dims=(3, 4)), dims=(4,))


def forward(net: nn.Module, batch: dict[str, torch.Tensor], x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The network on a batch's crops (or on ``x``, another view of them) with what it needs to know of
    each vertebra: its level and its patient's sex."""
    return net(batch["x"] if x is None else x, batch["level"], batch["sex"])


def _loss_terms(net: nn.Module, batch: dict[str, torch.Tensor], cfg, phase: str, per_sample: bool):
    """The phase's loss terms and every forward pass's outputs (the consistency term makes a second)."""
    out = forward(net, batch)
    if phase == "ssl":
        target = unwrap(net).feature_norm(batch["features"])
        terms = {"ssl": losses.ssl_loss(out["ssl"], target), "level": losses.task_losses(out, batch)["level"]}
        if float(cfg.train.loss.consistency) > 0:
            second = forward(net, batch, _second_view(batch["x"]))
            terms["consistency"] = losses.consistency_loss(out["ssl"], second["ssl"])
            return terms, [out, second]
        return terms, [out]
    terms = losses.task_losses(out, batch)
    terms["balance"] = losses.balance_loss(out["gate"], per_sample=per_sample)
    if float(cfg.train.loss.get("local_prior", 0.0)) > 0:
        terms["local_prior"] = losses.local_prior_loss(out, unwrap(net).labeled_patients)
    return terms, [out]


def _step(net, batch, cfg, phase, optimizer, device, per_sample: bool) -> dict[str, float]:
    batch = {k: v.to(device) for k, v in batch.items()}
    terms, passes = _loss_terms(net, batch, cfg, phase, per_sample)
    loss = sum(float(cfg.train.loss[k]) * v for k, v in terms.items())
    if per_sample:
        # Opacus needs a (here zero) per-sample gradient for every trainable parameter in every forward
        # pass, including the heads the phase does not train; a zero-weighted term routes one through
        # every output of every pass (else a second pass leaves activations Opacus never consumes).
        loss = loss + sum(0.0 * o.sum() for out in passes for o in out.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}


class _Meter:
    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.n = 0

    def add(self, values: Mapping[str, float], n: int) -> None:
        for k, v in values.items():
            self.sums[k] += v * n
        self.n += n

    def result(self) -> dict[str, float]:
        return {**{k: v / max(self.n, 1) for k, v in self.sums.items()}, "num_examples": float(self.n)}


def train_steps(
    model: nn.Module,
    data: SiteData,
    cfg,
    phase: str,
    optimizer: torch.optim.Optimizer,
    device: str,
    max_steps: int | None = None,
    private=None,
    salt: str | None = None,
    pass_index: int = 0,
) -> dict[str, float]:
    """One pass over the phase's rows (or ``max_steps`` batches, cycling); mean losses + num_examples.

    ``private``: the ``privacy.PrivateTraining`` from ``make_private``; its wrapped model, DP optimizer
    and Poisson-sampled loader are used instead of ``model``/``optimizer``/our loader. ``salt``: the
    site's secret in its batch order; ``pass_index``: the round or epoch, which draws the order
    (shuffle_seed).
    """
    net = private.model if private is not None else model
    opt = private.optimizer if private is not None else optimizer
    loader = (private.data_loader if private is not None
              else make_loader(data, cfg, phase, salt=salt, pass_index=pass_index))
    net.to(device).train()
    meter, steps = _Meter(), 0
    if len(loader.dataset) == 0:
        return meter.result()
    while True:
        for batch in loader:
            if len(batch["x"]) == 0:  # Poisson sampling can draw an empty batch
                continue
            meter.add(_step(net, batch, cfg, phase, opt, device, private is not None), len(batch["x"]))
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return meter.result()
        if max_steps is None:
            return meter.result()


def train_pooled(
    models: Mapping[str, nn.Module], datas: Mapping[str, SiteData], cfg, phase: str,
    optimizer: torch.optim.Optimizer, device: str, pass_index: int = 0,
) -> dict[str, float]:
    """One pass over every site's rows, batches interleaved across sites (central training), in the order
    of pass ``pass_index`` (the epoch: shuffle_seed).

    ``models`` share their shared modules (model.build_site_models); each batch goes through its own
    site's model so each site's local expert and calibration learn only from that site.
    """
    iters = {s: iter(make_loader(datas[s], cfg, phase, pass_index=pass_index)) for s in models
             if len(phase_rows(datas[s], phase))}
    meter = _Meter()
    for m in models.values():
        m.to(device).train()
    while iters:
        for site in list(iters):
            batch = next(iters[site], None)
            if batch is None:
                del iters[site]
                continue
            meter.add(_step(models[site], batch, cfg, phase, optimizer, device, False), len(batch["x"]))
    return meter.result()


@torch.no_grad()
def predict(model: nn.Module, data: SiteData, rows: np.ndarray, device: str, batch_size: int) -> dict[str, np.ndarray]:
    """Per-vertebra predictions: sbmd, device bmd, diagnosis probabilities p (N, 3), T-score, category
    (from T), predicted level, the gate, and what the site-local parts add to the device bmd (local_shift).
    Stays at the site (use metrics for anything that leaves)."""
    net = unwrap(model).to(device).eval()
    ds = CropDataset(data.cache, rows, augment=False)
    out: dict[str, list[np.ndarray]] = defaultdict(list)
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
        o = forward(net, {k: v.to(device) for k, v in batch.items()})
        out["sbmd"].append(o["sbmd"].cpu().numpy())
        out["bmd"].append(o["bmd"].cpu().numpy())
        out["p"].append(torch.softmax(o["diagnosis"], 1).cpu().numpy())
        out["level_pred"].append(o["level"].argmax(1).cpu().numpy())
        out["gate"].append(o["gate"].cpu().numpy())
        out["local_shift"].append(o["local_shift"].cpu().numpy())
    if not out:
        return {k: np.zeros((0, 3) if k == "p" else 0)
                for k in ("sbmd", "bmd", "p", "level_pred", "t", "category", "local_shift")}
    pred = {k: np.concatenate(v) for k, v in out.items()}
    pred["t"], pred["category"] = t_and_category(pred["bmd"], unwrap(model).manufacturer, data.cache.table.iloc[rows])
    return pred


def evaluate(model: nn.Module, data: SiteData, cfg, split: str, device: str) -> dict[str, float]:
    """Aggregate metrics of ``split`` (no per-patient values): see metrics.compute_metrics."""
    rows = data.splits[split]
    pred = predict(model, data, rows, device, batch_size=int(cfg.train.eval_batch_size))
    return metrics.compute_metrics(pred, data.cache.table.iloc[rows], data.manufacturer)


SELECTION_METRIC = "patient_mae_bmd"
"""What onboarding selects on: the site's own validation patients' device-BMD error (L1-L4 patient BMD,
the quantity the diagnosis is made from)."""


def _val_score(model: nn.Module, data: SiteData, cfg, device: str) -> float:
    """SELECTION_METRIC on the validation split; +inf when it has no labeled patient (nothing beats it)."""
    score = float(evaluate(model, data, cfg, "val", device).get(SELECTION_METRIC, float("nan")))
    return score if np.isfinite(score) else float("inf")


def _finite(score: float) -> float:
    return score if np.isfinite(score) else float("nan")


def fit_local(model: nn.Module, data: SiteData, cfg, device: str, epochs: int,
              shared_lr_factor: float | None = None, salt: str | None = None) -> dict[str, float]:
    """Onboard a site: train its local expert and calibration head on its labeled training split (and the
    shared parts too, at ``shared_lr_factor`` (default ``train.fit_local_shared_lr_factor``) times the
    learning rate, where that is above 0), then keep the epoch whose model predicts the site's own
    validation patients best, and the shared-only prediction (the model as it came) unless a fitted epoch
    beats it: with a handful of labeled patients fitting can make a site worse, and a site with no
    validation patient cannot show that it does not. Returns the last epoch's training losses,
    ``selected_epoch`` (0 = shared-only kept) and the validation score (SELECTION_METRIC) of the
    shared-only and of the selected model. ``salt``: as for train_steps."""
    net, params = unwrap(model), local_parameters(model)
    shared_factor = float(cfg.train.fit_local_shared_lr_factor if shared_lr_factor is None else shared_lr_factor)
    shared_only = _val_score(model, data, cfg, device)
    result: dict[str, float] = {"num_examples": 0.0}
    best, best_epoch, best_state = shared_only, 0, copy.deepcopy(net.state_dict())
    if params and len(data.splits["train"]):
        local_ids = {id(p) for p in params}
        frozen = [] if shared_factor > 0 else [p for p in net.parameters() if id(p) not in local_ids and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            # frozen groups get no step; the fit is the site's own, so no personalisation tail either
            recipe = Recipe({"site": model}, cfg, {"task": int(epochs)}, {"site": data}, priors=False,
                            personalise=False, shared_lr_factor=shared_factor)
            for epoch in range(int(epochs)):
                recipe.begin("task", epoch)
                result = train_steps(model, data, cfg, "task", recipe.optimizer, device, salt=salt, pass_index=epoch)
                score = _val_score(model, data, cfg, device)
                if improves(score, best):
                    best, best_epoch = score, epoch + 1
                    best_state = copy.deepcopy(net.state_dict())
        finally:
            for p in frozen:
                p.requires_grad_(True)
    net.load_state_dict(best_state)
    return {**result, "selected_epoch": float(best_epoch), f"val_{SELECTION_METRIC}_shared_only": _finite(shared_only),
            f"val_{SELECTION_METRIC}_selected": _finite(best)}


def final_refit(model: nn.Module, data: SiteData, cfg, device: str, salt: str | None = None) -> float | None:
    """After model selection, refit the site's local parts alone on its labeled training split for
    ``train.final_refit_epochs`` epochs from the selected model, keeping a fitted epoch only where it
    predicts the site's validation patients better (``fit_local``, shared parts frozen): the shared
    training ends with the local parts tuned to a moving shared model, not to the one kept. Returns the
    epoch kept (0: the selected model as it was), or None when no refit is configured."""
    epochs = int(cfg.train.final_refit_epochs)
    if epochs <= 0:
        return None
    return fit_local(model, data, cfg, device, epochs, shared_lr_factor=0.0, salt=salt)["selected_epoch"]
