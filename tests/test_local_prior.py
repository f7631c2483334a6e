"""The prior on the site-local parts (train.loss.local_prior, issue 10 item 5): what the local expert and the
calibration residual add to the device BMD is measured exactly, penalised in proportion to 1 / the site's
labeled patients, and training under it keeps the local correction smaller."""
from __future__ import annotations

import copy

import torch
from torch.utils.data import default_collate

from model_helpers import make_caches, run, tiny_cfg
from osteo_model import losses, model as osteo, training
from osteo_model.central import load_sites


def _x(n: int = 6, s: int = 16) -> torch.Tensor:
    return torch.randn(n, 2, s, s, s, generator=torch.Generator().manual_seed(5))


def _perturb_local(model: osteo.OsteoNet) -> None:
    with torch.no_grad():
        for p in osteo.local_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def _without_local(model: osteo.OsteoNet) -> osteo.OsteoNet:
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.local_expert[2].weight.zero_()
        twin.local_expert[2].bias.zero_()
        twin.calibration.residual.weight.zero_()
        twin.calibration.residual.bias.zero_()
    return twin


def test_local_shift_is_zero_on_a_fresh_model_and_exact_after_training_the_local_parts(tmp_path):
    model = osteo.build_model(tiny_cfg(tmp_path), 6, "ge_lunar").eval()
    with torch.no_grad():
        assert torch.equal(run(model, _x())["local_shift"], torch.zeros(6))
        _perturb_local(model)
        out, shared_only = run(model, _x()), run(_without_local(model), _x())
    assert float(out["local_shift"].abs().min()) > 1e-3  # the perturbed local parts move every prediction
    # the device BMD minus the local shift is what the shared parts alone predict
    assert torch.allclose(out["bmd"] - out["local_shift"], shared_only["bmd"], atol=1e-5)


def test_local_prior_loss_weighs_like_k_patients(tmp_path):
    model = osteo.build_model(tiny_cfg(tmp_path), 6, "hologic").eval()
    _perturb_local(model)
    with torch.no_grad():
        out = run(model, _x())
    few, many = losses.local_prior_loss(out, 4), losses.local_prior_loss(out, 16)
    assert float(few) > 0 and torch.isclose(few, 4 * many)
    expected = ((out["local_shift"] / osteo.SBMD_SCALE) ** 2).mean() / 4
    assert torch.isclose(few, expected)


def test_the_recipe_tells_each_model_its_labeled_patients_and_the_prior_shrinks_the_local_shift(tmp_path):
    make_caches(tmp_path)
    shifts = []
    for k in (0.0, 200.0):
        cfg = tiny_cfg(tmp_path, "train.local_lr_factor=10.0", "train.lr=1e-3", f"train.loss.local_prior={k}")
        datas = load_sites(cfg, ["site_a"])
        models = osteo.build_site_models(cfg, datas["site_a"].cache.features.shape[1], {"site_a": "hologic"})
        recipe = training.Recipe(models, cfg, {"ssl": 1, "task": 6}, datas)
        model, data = models["site_a"], datas["site_a"]
        assert model.labeled_patients == data.patients("train") > 0
        result = {}
        for index in range(6):  # cosine to ~0: Adam's steps of ~lr settle
            recipe.begin("task", index)
            result = training.train_steps(model, data, cfg, "task", recipe.optimizer, "cpu", pass_index=index)
        assert ("local_prior" in result) == (k > 0)  # the term is logged where it is trained
        model.eval()
        with torch.no_grad():
            rows = data.splits["train"]
            batch = default_collate([training.CropDataset(data.cache, rows)[i] for i in range(len(rows))])
            shifts.append(float(training.forward(model, batch)["local_shift"].abs().mean()))
    assert shifts[0] > 0 and shifts[1] < 0.5 * shifts[0]
