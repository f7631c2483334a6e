"""OsteoNet: texture-pretrained 3D encoder, mixture of experts with a site-local device expert,
multi-task heads and a site-local DXA calibration head.

Parameter ownership is declared ONCE here (SHARED_PREFIXES / LOCAL_PREFIXES); the federated payload,
the server checkpoint, the site state file and the Opacus wrapping all derive from these helpers.

Mixture of experts: K shared experts and one local expert are MLPs on the encoder embedding, mixed by a
gate (MLP on the embedding plus a one-hot of the site's DXA manufacturer) with a softmax over K+1.
The shared experts' weights are renormalised among themselves and the local expert adds a gated
residual whose last layer starts at zero: a site without a trained local expert (a new hospital) gets
exactly the shared mixture, and training a site's local expert can only move its predictions from there.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch
from torch import nn

from osteo_model.calibration import CalibrationHead, check_manufacturer
from osteo_model import bmd as bmdlib
from osteo_model.constants import CATEGORIES, HUI_1997, LEVELS, T_NORMAL_MIN, T_OSTEOPOROSIS_MAX
from osteo_model.errors import StateError
from osteo_model.networks import build_encoder

if TYPE_CHECKING:
    from osteo_model.dataset import SiteData

SHARED_PREFIXES: tuple[str, ...] = ("encoder.", "ssl_head.", "gate.", "shared_experts.", "heads.")
"""Aggregated across sites: encoder, SSL head, gate, shared experts, heads."""
LOCAL_PREFIXES: tuple[str, ...] = ("local_expert.", "calibration.", "feature_norm.")
"""Never leave the site: the DXA-device-specific expert, the calibration head and the standardisation of
the radiomic SSL targets (set from the site's own unlabeled rows, :func:`site_feature_stats`: no feature
moment ever leaves a hospital, and per-site standardisation also removes scanner shifts from the targets)."""

PRETRAINED_PREFIXES: tuple[str, ...] = ("encoder.", "ssl_head.")
"""What self-supervised pretraining produces and a supervised model (of any MoE variant) loads."""

SBMD_CENTER, SBMD_SCALE = 1.0, 0.15
"""Output scaling of the sBMD head (g/cm^2): keeps the regression target near unit scale (not clinical)."""
LOCAL_GATE_BIAS = -2.0
"""Default initial gate logit of the local expert (``model.local_gate_bias``): ~4 % of the gate weight next
to three shared experts at logit 0. The local expert's last layer starts at zero, so this logit does not
change a fresh model's predictions; it sets how strongly the local expert's training moves them."""
T_SOFTNESS = 0.25
"""Width (T-score units) of the soft WHO thresholds that anchor the diagnosis head (not clinical)."""
FEATURE_CLIP = 5.0
"""Standardised radiomic features are clipped to +-5 SD so heavy-tailed features do not dominate SSL."""


class FeatureNorm(nn.Module):
    """Standardisation of the radiomic SSL targets (site-local buffers, set from the site's unlabeled rows)."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = (features - self.mean) / self.std
        return torch.nan_to_num(z, nan=0.0, posinf=FEATURE_CLIP, neginf=-FEATURE_CLIP).clamp(-FEATURE_CLIP, FEATURE_CLIP)


def who_category_logits(t: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of normal / osteopenia / osteoporosis implied by a T-score (cumulative logits
    centred on the WHO thresholds). The diagnosis head adds a learned residual to these, so it starts
    out agreeing with the T-score and can never be anti-correlated with the predicted BMD."""
    p_low = torch.sigmoid((T_NORMAL_MIN - t) / T_SOFTNESS)  # P(T < -1.0)
    p_osteo = torch.sigmoid((T_OSTEOPOROSIS_MAX - t) / T_SOFTNESS)  # P(T <= -2.5)
    probs = torch.stack([1 - p_low, p_low - p_osteo, p_osteo], dim=-1)
    return probs.clamp_min(1e-6).log()


def _mlp(n_in: int, n_hidden: int, n_out: int, zero_last: bool = False) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))
    if zero_last:
        nn.init.zeros_(mlp[2].weight)
        nn.init.zeros_(mlp[2].bias)
    return mlp


class OsteoNet(nn.Module):
    """Per-vertebra network; ``forward`` returns every head's output so that each parameter takes part in
    every step (Opacus needs per-sample gradients for all trainable parameters)."""

    labeled_patients: int = 0
    """Labeled training patients of the site this model trains at (set by training.Recipe; not state):
    the strength of the local prior (losses.local_prior_loss) is relative to it."""

    def __init__(self, model_cfg, n_features: int, manufacturer: str) -> None:
        super().__init__()
        embed, hidden = int(model_cfg.embed_dim), int(model_cfg.expert_hidden)
        self.moe = bool(model_cfg.get("moe", True))
        self.encoder = build_encoder(model_cfg)
        self.ssl_head = _mlp(embed, embed, n_features)
        self.feature_norm = FeatureNorm(n_features)
        n_shared = int(model_cfg.num_shared_experts) if self.moe else 1
        self.shared_experts = nn.ModuleList(_mlp(embed, hidden, hidden) for _ in range(n_shared))
        self.use_metadata = self.moe and bool(model_cfg.get("gate_uses_metadata", True))
        manufacturer = check_manufacturer(manufacturer)
        onehot = torch.tensor([float(m == manufacturer) for m in sorted(HUI_1997)])
        self.register_buffer("device_onehot", onehot, persistent=False)
        if self.moe:
            gate_in = embed + (len(onehot) if self.use_metadata else 0)
            self.gate = _mlp(gate_in, hidden, n_shared + 1)
            with torch.no_grad():
                self.gate[2].bias[-1] = float(model_cfg.get("local_gate_bias", LOCAL_GATE_BIAS))
            self.local_expert = _mlp(embed, hidden, hidden, zero_last=True)
        self.dropout = nn.Dropout(float(model_cfg.get("dropout", 0.0)))
        self.heads = nn.ModuleDict(
            {
                "sbmd": nn.Linear(hidden, 1),
                "diagnosis": nn.Linear(hidden, len(CATEGORIES)),
                "level": nn.Linear(embed, len(LEVELS)),
            }
        )
        nn.init.zeros_(self.heads["diagnosis"].weight)
        nn.init.zeros_(self.heads["diagnosis"].bias)
        self.calibration = CalibrationHead(manufacturer, learned=str(model_cfg.get("calibration", "learned")) == "learned")
        means, sd = bmdlib.level_reference_table(manufacturer)
        self.register_buffer("level_reference", torch.tensor(means, dtype=torch.float32), persistent=False)
        self.level_reference_sd = sd

    @property
    def manufacturer(self) -> str:
        return self.calibration.manufacturer

    def forward(self, x: torch.Tensor, level: torch.Tensor, sex: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head's output for crops ``x`` of vertebrae at ``level`` (LEVELS index, from the segmentation)
        of patients of ``sex`` (bmd.SEX_CODES index): the diagnosis starts from the T-score on the level's own
        reference, the one its labels are on (dxa.level_labels)."""
        z = self.encoder(x)
        experts = torch.stack([e(z) for e in self.shared_experts], dim=1)  # (B, K, H)
        if self.moe:
            gate_in = torch.cat([z, self.device_onehot.expand(len(z), -1)], 1) if self.use_metadata else z
            gate = torch.softmax(self.gate(gate_in), dim=1)
            shared_w = gate[:, :-1] / gate[:, :-1].sum(1, keepdim=True)
            h = (shared_w.unsqueeze(-1) * experts).sum(1) + gate[:, -1:] * self.local_expert(z)
        else:
            gate = torch.ones(len(z), 1, device=z.device)
            h = experts[:, 0]
        h = self.dropout(h)
        sbmd = SBMD_CENTER + SBMD_SCALE * self.heads["sbmd"](h).squeeze(-1)
        device_bmd = self.calibration(sbmd)
        t = (device_bmd - self.level_reference[sex, level]) / self.level_reference_sd
        return {
            "ssl": self.ssl_head(z),
            "gate": gate,
            "sbmd": sbmd,
            "bmd": device_bmd,
            "local_shift": self._local_shift(z, gate, sbmd),
            "diagnosis": who_category_logits(t) + self.heads["diagnosis"](h),
            "level": self.heads["level"](z),
        }

    def _local_shift(self, z: torch.Tensor, gate: torch.Tensor, sbmd: torch.Tensor) -> torch.Tensor:
        """What the site-local parts add to the device BMD (g/cm^2): the local expert's share of the sBMD (the
        head is linear, and dropout keeps the mean) through Hui 1997, plus the calibration residual; the
        shared parts alone predict ``bmd - local_shift``. Its gradient reaches only the local parameters, so
        a penalty on it (losses.local_prior_loss) shrinks what the site learns without moving the shared
        model to dodge it."""
        sbmd = sbmd.detach()
        shift = self.calibration.residual_shift(sbmd)
        if self.moe:
            local = gate[:, -1:].detach() * self.local_expert(z.detach())
            local_sbmd = SBMD_SCALE * (local @ self.heads["sbmd"].weight.detach().T).squeeze(-1)
            without = bmdlib.from_sbmd(sbmd - local_sbmd, self.manufacturer)
            shift = shift + bmdlib.from_sbmd(sbmd, self.manufacturer) - without
        return shift


def build_model(cfg, n_features: int, manufacturer: str) -> OsteoNet:
    """The model for one site, its calibration initialised for the site's DXA manufacturer."""
    torch.manual_seed(int(cfg.seed))
    model = OsteoNet(cfg.model, n_features, manufacturer)
    _check_partition(model)
    return model


def build_site_models(cfg, n_features: int, manufacturers: Mapping[str, str]) -> dict[str, OsteoNet]:
    """One model per site for pooled (central) training: shared modules are the same objects in every
    model, local modules are each site's own."""
    models: dict[str, OsteoNet] = {}
    first: OsteoNet | None = None
    for site, manufacturer in manufacturers.items():
        model = build_model(cfg, n_features, manufacturer)
        if first is None:
            first = model
        else:
            for prefix in SHARED_PREFIXES:
                name = prefix.rstrip(".")
                if hasattr(first, name):
                    setattr(model, name, getattr(first, name))
        models[site] = model
    return models


def unwrap(model: nn.Module) -> nn.Module:
    """The OsteoNet inside an Opacus GradSampleModule (which prefixes keys with ``_module.``)."""
    return getattr(model, "_module", model)


def _check_partition(model: nn.Module) -> None:
    keys = list(unwrap(model).state_dict())
    shared = {k for k in keys if k.startswith(SHARED_PREFIXES)}
    local = {k for k in keys if k.startswith(LOCAL_PREFIXES)}
    assert not shared & local, f"keys both shared and local: {sorted(shared & local)}"
    assert shared | local == set(keys), f"keys neither shared nor local: {sorted(set(keys) - shared - local)}"


def shared_keys(model: nn.Module) -> list[str]:
    return [k for k in unwrap(model).state_dict() if k.startswith(SHARED_PREFIXES)]


def local_keys(model: nn.Module) -> list[str]:
    return [k for k in unwrap(model).state_dict() if k.startswith(LOCAL_PREFIXES)]


def _state(model: nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    full = unwrap(model).state_dict()
    return {k: full[k].detach().cpu().clone() for k in keys}


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return _state(model, shared_keys(model))


def local_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return _state(model, local_keys(model))


def _load(model: nn.Module, arrays: Mapping[str, np.ndarray | torch.Tensor], expected: list[str], what: str) -> None:
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise StateError(None, f"{what} state keys differ from the model's: missing {missing[:5]}, unexpected {extra[:5]}")
    target = unwrap(model).state_dict()
    tensors = {}
    for k, v in arrays.items():
        t = torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v)
        if t.shape != target[k].shape:
            raise StateError(None, f"{what} state {k}: shape {tuple(t.shape)} != model {tuple(target[k].shape)}")
        tensors[k] = t.to(dtype=target[k].dtype)
    unwrap(model).load_state_dict(tensors, strict=False)


def load_shared(model: nn.Module, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Load shared weights; StateError if the key set or a shape differs."""
    _load(model, arrays, shared_keys(model), "shared")


def load_local(model: nn.Module, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Load the site's local expert and calibration; StateError if the key set or a shape differs."""
    _load(model, arrays, local_keys(model), "local")


def _params(model: nn.Module, prefixes: tuple[str, ...]) -> list[nn.Parameter]:
    return [p for k, p in unwrap(model).named_parameters() if k.startswith(prefixes)]


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    return _params(model, SHARED_PREFIXES)


def local_parameters(model: nn.Module) -> list[nn.Parameter]:
    return _params(model, LOCAL_PREFIXES)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and SD over finite values (SD 1 where a feature is constant)."""
    f = np.asarray(features, dtype=np.float64)
    f = np.where(np.isfinite(f), f, np.nan)
    mean = np.nan_to_num(np.nanmean(f, axis=0))
    std = np.nan_to_num(np.nanstd(f, axis=0))
    return mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32)


def site_feature_stats(data: SiteData) -> tuple[np.ndarray, np.ndarray]:
    """Standardisation of one site's SSL targets from its own unlabeled split (never val/test patients);
    central and federated training and the evaluation of new sites all call this, so they standardise on
    the same rows. A site without unlabeled rows keeps the identity (mean 0, SD 1)."""
    rows = np.asarray(data.splits["unlabeled"])
    n_features = np.asarray(data.cache.features).shape[1]
    if not len(rows):
        return np.zeros(n_features, np.float32), np.ones(n_features, np.float32)
    return feature_stats(np.asarray(data.cache.features)[rows])


def standardise_on_site(model: nn.Module, data: SiteData) -> None:
    """Set ``model``'s (site-local) feature standardisation from the site's own unlabeled rows."""
    set_feature_stats(model, *site_feature_stats(data))


def load_pretrained(model: nn.Module, shared: Mapping[str, torch.Tensor]) -> list[str]:
    """Load the self-supervised part (PRETRAINED_PREFIXES) of another checkpoint's shared state; returns
    the keys loaded. StateError if the encoder does not match (other model config or feature set)."""
    keys = [k for k in shared_keys(model) if k.startswith(PRETRAINED_PREFIXES)]
    _load(model, {k: shared[k] for k in keys if k in shared}, keys, "pretrained")
    return keys


def set_sbmd_prior(model: nn.Module, mean_sbmd: float) -> None:
    """Start the sBMD head at the training population's mean sBMD (its bias), so supervised training
    does not spend its first hundreds of Adam steps walking the intercept from SBMD_CENTER."""
    with torch.no_grad():
        unwrap(model).heads["sbmd"].bias.fill_((float(mean_sbmd) - SBMD_CENTER) / SBMD_SCALE)


def set_feature_stats(model: nn.Module, mean: np.ndarray, std: np.ndarray) -> None:
    """Set the site-local feature standardisation buffers (before self-supervision)."""
    norm = unwrap(model).feature_norm
    norm.mean.copy_(torch.as_tensor(mean, dtype=norm.mean.dtype))
    norm.std.copy_(torch.as_tensor(std, dtype=norm.std.dtype))
