"""The DXA manufacturer reaches the shared gate only while ``model.gate_uses_metadata`` is on, and the
evidence benchmark's "no manufacturer in gate" methods really turn it off (issue 10 item 5)."""
from __future__ import annotations

import pytest
import torch

from osteo_model import model as osteo
from osteofl.simulation import evidence

from model_helpers import run, tiny_cfg


def _gates(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate of two models with the SAME weights that differ only in their site's DXA manufacturer."""
    hologic, lunar = osteo.build_model(cfg, 6, "hologic"), osteo.build_model(cfg, 6, "ge_lunar")
    lunar.load_state_dict(hologic.state_dict())
    x = torch.randn(4, 2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return run(hologic.eval(), x)["gate"], run(lunar.eval(), x)["gate"]


def _method_cfg(tmp_path, method: str):
    return tiny_cfg(tmp_path, *map(str, evidence.load_experiment("evidence_gate").methods[method].get("overrides") or []))


@pytest.mark.parametrize("method", ["osteofl", "fedavg"])
def test_gate_depends_on_the_manufacturer_when_on(tmp_path, method):
    a, b = _gates(_method_cfg(tmp_path, method))
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["osteofl_nometa", "fedavg_nometa"])
def test_gate_ignores_the_manufacturer_when_off(tmp_path, method):
    cfg = _method_cfg(tmp_path, method)
    assert not cfg.model.gate_uses_metadata
    a, b = _gates(cfg)
    assert torch.equal(a, b)
    # the gate sees the embedding alone: no input column is left for a one-hot
    gate_in = osteo.build_model(cfg, 6, "hologic").gate[0].in_features
    assert gate_in == int(cfg.model.embed_dim)
