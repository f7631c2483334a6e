"""A site's DP-SGD round: Opacus wrapping via ``osteo_model.privacy`` and the cumulative epsilon kept in
the site state, so that spending adds up across rounds, runs and restarts, and training stops for good
once ``privacy.epsilon_budget`` is reached.
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
    p, batch = cfg.privacy, int(cfg.train.batch_size)
    costs = []
    for phase in training.PHASES:
        n = len(training.phase_dataset(data, cfg, phase, per_patient=True))
        if n:
            costs.append(f"{_privacy().pass_epsilon(n, batch, p):.2f} per {phase} round ({n} patients)")
    return (f"DP floor: noise {p.noise_multiplier}, clip {p.max_grad_norm}, delta {p.delta}; epsilon {spent:.2f} "
            f"spent of {p.epsilon_budget}; a round alone at batch {batch} costs {', '.join(costs) or 'nothing'}")


class PrivacySession:
    """DP for one training message of one site (a no-op when ``privacy.enabled`` is false)."""

    def __init__(self, session: SiteSession) -> None:
        self.session = session
        self.cfg = session.cfg.privacy
        self.enabled = bool(self.cfg.enabled)

    def budget_spent(self) -> bool:
        if not self.enabled:
            return False
        privacy = _privacy()
        return privacy.budget_exhausted(privacy.EpsilonAccountant(self.session.state.accountant), self.cfg)

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
