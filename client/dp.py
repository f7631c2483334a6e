"""A site's DP-SGD round: Opacus wrapping via ``osteo_model.privacy`` and the cumulative epsilon kept in
the site state, so that spending adds up across rounds, runs and restarts; a round that would take epsilon
over ``privacy.epsilon_budget`` is not trained (the budget is a cap, known before the round from the
accountant).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from osteo_model import training
from osteo_model.dataset import SiteData
from osteofl.client.site_session import SiteSession

if TYPE_CHECKING:
    from osteo_model import privacy


def _privacy():
    """Opacus is imported only by sites that use DP: it costs ~2 s of start-up per ClientApp process."""
    from osteo_model import privacy

    return privacy


def describe(cfg: DictConfig, data: SiteData, spent: float) -> str:
    """The site's DP floor in one line for its start-up log: what a round costs a patient at the site's own
    batch size, so a data-protection officer sees before any run how far the budget goes."""
    if not cfg.privacy.enabled:
        return "DP: no floor (on only if a run asks for it)"
    p, costs = cfg.privacy, []
    for phase in training.PHASES:
        loader = training.make_loader(data, cfg, phase, per_patient=True)  # what a DP round passes over
        if len(loader.dataset):
            per_pass = len(loader)
            costs.append(f"{_privacy().epsilon_after(p, per_pass, per_pass):.2f} per {phase} round "
                         f"({len(loader.dataset)} patients)")
    return (f"DP floor: noise {p.noise_multiplier}, clip {p.max_grad_norm}, delta {p.delta}; epsilon {spent:.2f} "
            f"spent of {p.epsilon_budget}; a round alone at batch {cfg.train.batch_size} costs "
            f"{', '.join(costs) or 'nothing'}")


class PrivacySession:
    """DP for one training message of one site (a no-op when ``privacy.enabled`` is false)."""

    def __init__(self, session: SiteSession) -> None:
        self.session = session
        self.cfg = session.cfg.privacy
        self.enabled = bool(self.cfg.enabled)

    def refusal(self, steps_per_pass: int, steps: int) -> str | None:
        """Why the site trains no more: its ε budget is spent, or this round's ``steps`` DP steps would take
        ε over it (the budget is a cap, not a threshold one round may cross); None when it may train."""
        if not self.enabled:
            return None
        privacy, budget = _privacy(), float(self.cfg.epsilon_budget)
        spent = privacy.EpsilonAccountant(self.session.state.accountant).epsilon(float(self.cfg.delta))
        if spent >= budget:
            return f"privacy budget spent (epsilon {spent:.3f} >= {budget}); not training any more"
        after = privacy.epsilon_after(self.cfg, steps_per_pass, steps, self.session.state.accountant)
        if after > budget:
            return (f"privacy budget nearly spent: this round's {steps} DP steps would take epsilon from {spent:.3f} "
                    f"to {after:.3f}, over the budget {budget}; not training any more")
        return None

    def attach(self, optimizer: torch.optim.Optimizer, phase: str) -> "privacy.PrivateTraining | None":
        """Wrap model, optimizer and a Poisson-sampled loader of the phase's patients for DP-SGD."""
        if not self.enabled:
            return None
        s = self.session
        loader = training.make_loader(s.data, s.cfg, phase, per_patient=True)
        return _privacy().make_private(s.model, optimizer, loader, self.cfg, accountant_state=s.state.accountant)

    def record(self, private: "privacy.PrivateTraining | None") -> None:
        """Store the accountant (all DP steps so far) and the cumulative epsilon in the site state."""
        if private is None:
            return
        self.session.state.accountant = private.accountant.state()
        self.session.state.epsilon = private.epsilon()
