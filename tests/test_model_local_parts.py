"""The method knobs of the site-local parts (issue 10 item 5): the local expert's initial gate logit
(model.local_gate_bias) and the personalisation steps at the end of the task phase (train.personalise_steps)."""
from __future__ import annotations

import pytest
import torch

from model_helpers import make_caches, run, tiny_cfg
from osteo_model import model as osteo, training
from osteo_model.central import load_sites


def _x(n: int = 4, s: int = 16) -> torch.Tensor:
    return torch.randn(n, 2, s, s, s, generator=torch.Generator().manual_seed(3))


def test_local_gate_bias_sets_the_local_weight_but_not_a_fresh_prediction(tmp_path):
    outs = []
    for bias in (-2.0, 0.0, 1.5):
        m = osteo.build_model(tiny_cfg(tmp_path, f"model.local_gate_bias={bias}"), 6, "hologic").eval()
        assert float(m.gate[2].bias[-1].detach()) == bias
        with torch.no_grad():
            outs.append(run(m, _x()))
    weights = [float(o["gate"][:, -1].mean()) for o in outs]
    assert weights[0] < 0.1 < weights[1] < weights[2]
    for out in outs[1:]:  # the local expert's output starts at zero: same device BMD whatever its weight
        assert torch.allclose(out["bmd"], outs[0]["bmd"], atol=1e-6)


def test_default_local_gate_bias_is_the_constant(tmp_path):
    assert float(osteo.build_model(tiny_cfg(tmp_path), 6, "hologic").gate[2].bias[-1].detach()) == osteo.LOCAL_GATE_BIAS


def _site(tmp_path, *extra: str):
    make_caches(tmp_path)
    cfg = tiny_cfg(tmp_path, "train.task_epochs=4", "train.local_lr_factor=5.0", "train.lr=1e-3", *extra)
    data = load_sites(cfg, ["site_a"])
    model = osteo.build_site_models(cfg, data["site_a"].cache.features.shape[1], {"site_a": "hologic"})
    return cfg, data, model


def test_personalisation_steps_freeze_the_shared_parts_and_restart_the_local_schedule(tmp_path):
    cfg, datas, models = _site(tmp_path, "train.personalise_steps=2")
    recipe = training.Recipe(models, cfg, {"ssl": 1, "task": 4}, datas)
    lrs = []
    for index in range(4):
        recipe.begin("task", index)
        lrs.append([g["lr"] for g in recipe.optimizer.param_groups])
    # shared steps 0-1: a cosine over 2 steps; personalisation 2-3: shared 0, local restarts at 5 x lr
    assert lrs == [pytest.approx([1e-3, 5e-3]), pytest.approx([5e-4, 2.5e-3]),
                   pytest.approx([0.0, 5e-3]), pytest.approx([0.0, 2.5e-3])]
    recipe.begin("ssl", 0)
    assert [g["lr"] for g in recipe.optimizer.param_groups] == pytest.approx([1e-3, 5e-3])  # SSL untouched
    model = models["site_a"]
    recipe.begin("task", 2)
    shared, local = osteo.shared_state(model), osteo.local_state(model)
    training.train_steps(model, datas["site_a"], cfg, "task", recipe.optimizer, "cpu", max_steps=2)
    assert all(torch.equal(v, osteo.shared_state(model)[k]) for k, v in shared.items())
    assert any(not torch.equal(v, osteo.local_state(model)[k]) for k, v in local.items())


def test_personalisation_needs_a_shared_task_step_and_leaves_onboarding_alone(tmp_path):
    cfg, datas, models = _site(tmp_path, "train.personalise_steps=4")
    with pytest.raises(ValueError, match="personalise_steps=4"):
        training.Recipe(models, cfg, {"ssl": 1, "task": 4}, datas)
    onboarding = training.Recipe(models, cfg, {"task": 4}, priors=False, personalise=False)
    onboarding.begin("task", 0)
    assert [g["lr"] for g in onboarding.optimizer.param_groups] == pytest.approx([1e-3, 5e-3])
