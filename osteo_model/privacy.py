"""DP-SGD with Opacus and a privacy accountant whose state survives rounds, runs and restarts.

The site's epsilon is cumulative: the accountant's history (noise multiplier, sample rate, steps of every
DP step taken so far) is saved as plain JSON-able data and restored before the next round; epsilon is
always computed from the whole history.
"""
from __future__ import annotations

import secrets
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from osteo_model.dataset import OneRowPerPatient
from osteo_model.errors import ConfigError, StateError


class EpsilonAccountant:
    """RDP accountant with JSON-able state: ``state()`` / ``load_state()`` / ``epsilon(delta)``."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.accountant = RDPAccountant()
        if state:
            self.load_state(state)

    def state(self) -> dict[str, Any]:
        return {"mechanism": self.accountant.mechanism(),
                "history": [list(map(float, h[:2])) + [int(h[2])] for h in self.accountant.history]}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("mechanism") != self.accountant.mechanism() or not isinstance(state.get("history"), list):
            raise StateError(None, f"privacy accountant state is not an RDP history: {sorted(state)}")
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]

    def epsilon(self, delta: float) -> float:
        return float(self.accountant.get_epsilon(delta)) if self.accountant.history else 0.0

    def steps(self) -> int:
        return sum(n for _, _, n in self.accountant.history)


_WRAPPERS: "weakref.WeakKeyDictionary[nn.Module, GradSampleModule]" = weakref.WeakKeyDictionary()
"""model -> its current Opacus wrapper, so that wrapping it again (next round) replaces the old hooks."""


@dataclass
class PrivateTraining:
    """What training.train_steps(..., private=...) uses: the Opacus-wrapped model, DP optimizer and the
    Poisson-sampled loader; ``accountant`` accumulates every DP step taken."""

    model: GradSampleModule
    optimizer: torch.optim.Optimizer
    data_loader: DataLoader
    accountant: EpsilonAccountant
    delta: float

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.delta)

    def release(self) -> nn.Module:
        """Remove Opacus's hooks and return the plain model (make_private also does this itself when the
        same model is wrapped again)."""
        _WRAPPERS.pop(self.model._module, None)
        self.model._close()
        return self.model._module


def make_private(
    model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader, privacy_cfg,
    accountant_state: dict[str, Any] | None = None,
) -> PrivateTraining:
    """Wrap for DP-SGD (per-sample clipping to ``max_grad_norm``, Gaussian noise ``noise_multiplier``).

    ``accountant_state``: a previous ``PrivateTraining.accountant.state()`` so epsilon keeps adding up.
    ``data_loader`` must be over patients (``training.make_loader(..., per_patient=True)``): the accountant
    counts the loader's items as the records it protects.
    """
    if not isinstance(data_loader.dataset, OneRowPerPatient):
        raise ConfigError(None, "DP-SGD needs a loader with one item per patient (per_patient=True): over "
                                "vertebrae, the reported epsilon would bound a vertebra, not a patient")
    previous = _WRAPPERS.pop(model, None)
    if previous is not None:  # wrapped in an earlier round: Opacus refuses to hook a model twice
        previous._close()
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(None, f"model not usable with DP-SGD: {errors[0]}")
    accountant = EpsilonAccountant(accountant_state)
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant = accountant.accountant
    device = next(model.parameters()).device
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=float(privacy_cfg.noise_multiplier),
        max_grad_norm=float(privacy_cfg.max_grad_norm),
        poisson_sampling=True,
        noise_generator=_secret_generator(device),
    )
    dp_loader.batch_sampler.generator = _secret_generator(torch.device("cpu"))  # Opacus's sampler draws on the CPU
    _WRAPPERS[model] = dp_model
    return PrivateTraining(dp_model, dp_optimizer, dp_loader, accountant, float(privacy_cfg.delta))


def _secret_generator(device: torch.device) -> torch.Generator:
    """Randomness for the DP noise and the Poisson sampling, seeded from the operating system's entropy.
    Not from torch's global generator: the run's ``seed`` (the coordinator's) seeds that, so whoever knows
    it could replay the site's noise and batches and subtract the noise from its update, and every round
    would draw the same noise. (Opacus's ``secure_mode`` would also need torchcsprng, not installable here.)"""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def epsilon_after(privacy_cfg, steps_per_pass: int, steps: int, state: dict[str, Any] | None = None) -> float:
    """ε once ``steps`` more DP steps are taken at Opacus's Poisson rate (1 / steps per pass) on top of the
    accountant ``state`` (None: nothing spent yet): what a round will cost, known before it trains."""
    accountant = EpsilonAccountant(state)
    accountant.accountant.history.append((float(privacy_cfg.noise_multiplier), 1 / max(steps_per_pass, 1), int(steps)))
    return accountant.epsilon(float(privacy_cfg.delta))
