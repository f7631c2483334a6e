"""FedProx's proximal term (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"), applied
to the shared parameters of any optimiser, so that a federated site and a central experiment that wants
the same pull towards a reference model use one implementation.
"""
from __future__ import annotations

import torch

from osteo_model.model import shared_parameters


def attach_proximal_term(optimizer: torch.optim.Optimizer, model: torch.nn.Module, mu: float) -> None:
    """Add ``mu * (w - w_anchor)`` to every shared parameter's gradient before each step, the anchor being
    the weights at the time of the call (the global model of the round): the gradient of
    ``mu/2 ||w - w_anchor||^2``. Under DP-SGD the hook runs after clipping and noise; the term depends on
    no data, so it costs no privacy. The anchor follows its parameter to the device it trains on (the
    model may be moved there after the call). ``mu <= 0`` attaches nothing."""
    if mu <= 0:
        return
    anchors = [(p, p.detach().clone()) for p in shared_parameters(model)]

    def add_proximal(_optimizer, _args, _kwargs) -> None:
        with torch.no_grad():
            for p, anchor in anchors:
                if p.grad is not None:
                    p.grad.add_(p.detach() - anchor.to(p.device), alpha=mu)

    optimizer.register_step_pre_hook(add_proximal)
