"""Everything a training path touches lives on the one ``device`` it was given.

CI has no GPU, so PyTorch's "meta" device stands in for CUDA: a tensor left on the CPU next to a model on
another device shows here as it did on an H200 (README: GPU check), where a resumed central run and
FedProx's first round stopped with "Expected all tensors to be on the same device".
"""
from __future__ import annotations

import pytest
import torch

from osteo_model import central, model as osteo
from osteo_model.checkpoints import load_model_state
from osteo_model.proximal import attach_proximal_term

from model_helpers import make_caches, tiny_cfg


class _Stop(Exception):
    pass


def _tensor_devices(models, optimizer) -> dict[str, set[str]]:
    state = {t.device.type for s in optimizer.state.values() for k, t in s.items()
             if torch.is_tensor(t) and k != "step"}  # Adam keeps its step counter on the CPU by design
    params = {t.device.type for m in models.values() for t in [*m.parameters(), *m.buffers()]}
    return {"params": params, "optimizer_state": state}


def test_resumed_central_run_restores_the_optimizer_beside_the_model(tmp_path, monkeypatch):
    root = tmp_path / "root"
    make_caches(root, n_patients=6)
    plan = ("train.ssl_epochs=2", "train.task_epochs=0")
    datas = central.load_sites(tiny_cfg(root, *plan), ["site_a", "site_b"])

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("[2/2]"):
            raise _Stop

    with pytest.raises(_Stop):
        central.train_central(tiny_cfg(root, *plan), datas, tmp_path / "run", log=stop_after_first_epoch)
    assert load_model_state(tmp_path / "run" / "checkpoint.pt")["optimizer"]["state"]  # Adam's moments were saved

    seen = {}

    def inspect_instead_of_training(models, datas, cfg, phase, optimizer, device, pass_index=0):
        seen.update(device=device, **_tensor_devices(models, optimizer))
        raise _Stop

    monkeypatch.setattr(central, "resolve_device", lambda cfg: "meta")
    monkeypatch.setattr(central, "train_pooled", inspect_instead_of_training)
    with pytest.raises(_Stop):
        central.train_central(tiny_cfg(root, *plan, "train.resume=true"), datas, tmp_path / "run", log=lambda _: None)
    assert seen == {"device": "meta", "params": {"meta"}, "optimizer_state": {"meta"}}


def test_proximal_anchor_follows_a_model_moved_after_the_term_was_attached(tmp_path, monkeypatch):
    model = osteo.build_model(tiny_cfg(tmp_path), 6, "hologic")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_proximal_term(optimizer, model, mu=0.5)
    # as a simulated site's first round does: the term attached, then training moves the model; the swap keeps
    # the parameter objects, as a move to CUDA does (to meta, PyTorch would otherwise make new ones)
    monkeypatch.setattr(torch.__future__, "get_swap_module_params_on_conversion", lambda: True)
    model.to("meta")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert {p.device.type for p in model.parameters()} == {"meta"}
