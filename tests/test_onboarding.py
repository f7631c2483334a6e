"""Onboarding cannot make a site worse: fit_local keeps the shared-only prediction unless fitting improves
the site's own validation patients."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from osteo_model import model as osteo
from osteo_model.dataset import load_site_data
from osteo_model.training import SELECTION_METRIC, evaluate, final_refit, fit_local

from model_helpers import make_caches, tiny_cfg

SCORE = f"val_{SELECTION_METRIC}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("onboard")
    make_caches(root)
    return root


def _onboarding(root, shift_splits: tuple[str, ...], shift: float = 0.5, *overrides: str):
    """A new site whose DXA reads ``shift`` g/cm^2 high on the rows of ``shift_splits``, and a model with
    trained-nowhere local parts (what a new site gets)."""
    cfg = tiny_cfg(root, "train.local_lr_factor=30", *overrides)
    torch.manual_seed(0)
    data = load_site_data(root / "data" / "cache" / "site_ext", cfg)
    col = data.cache.table.columns.get_loc("bmd")
    for split in shift_splits:
        data.cache.table.iloc[data.splits[split], col] += shift
    model = osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer)
    osteo.set_feature_stats(model, *osteo.feature_stats(np.asarray(data.cache.features)))
    return cfg, data, model


def test_fitting_that_hurts_the_site_is_not_kept(root):
    """The training patients' DXA is off by +0.5 g/cm^2, the validation patients' is not: fitting learns
    the offset and would make the site worse, so the shared-only parts are kept, bit for bit."""
    cfg, data, model = _onboarding(root, ("train",))
    local0 = osteo.local_state(model)
    before = evaluate(model, data, cfg, "val", "cpu")[SELECTION_METRIC]
    res = fit_local(model, data, cfg, "cpu", epochs=4)
    assert res["num_examples"] == len(data.splits["train"])  # it did train
    assert res["selected_epoch"] == 0
    assert res[f"{SCORE}_selected"] == res[f"{SCORE}_shared_only"] == pytest.approx(before)
    assert all(torch.equal(v, osteo.local_state(model)[k]) for k, v in local0.items())
    assert evaluate(model, data, cfg, "val", "cpu")[SELECTION_METRIC] == pytest.approx(before)
    assert all(p.requires_grad for p in model.parameters())


def test_fitting_that_helps_is_kept_and_shared_parts_never_move(root):
    """The whole site's DXA reads +0.5 high (a device offset only local parts can learn): the fitted
    parts beat the shared-only ones on the validation patients and are kept."""
    cfg, data, model = _onboarding(root, ("train", "val", "test"))
    shared0, local0 = osteo.shared_state(model), osteo.local_state(model)
    res = fit_local(model, data, cfg, "cpu", epochs=4)
    assert res["selected_epoch"] >= 1
    assert res[f"{SCORE}_selected"] < res[f"{SCORE}_shared_only"] - 0.05
    assert evaluate(model, data, cfg, "val", "cpu")[SELECTION_METRIC] == pytest.approx(res[f"{SCORE}_selected"])
    assert all(torch.equal(v, osteo.shared_state(model)[k]) for k, v in shared0.items())
    assert any(not torch.equal(v, osteo.local_state(model)[k]) for k, v in local0.items())


def test_site_without_validation_patients_keeps_shared_only(root):
    cfg, data, model = _onboarding(root, ("train", "val", "test"))
    data.splits["val"] = data.splits["val"][:0]
    local0 = osteo.local_state(model)
    res = fit_local(model, data, cfg, "cpu", epochs=1)
    assert res["selected_epoch"] == 0 and np.isnan(res[f"{SCORE}_shared_only"])
    assert all(torch.equal(v, osteo.local_state(model)[k]) for k, v in local0.items())


@pytest.mark.parametrize("judged", [True, False])
def test_onboarding_that_fine_tunes_the_shared_parts_keeps_them_only_with_a_kept_epoch(root, judged):
    """``train.fit_local_shared_lr_factor`` > 0 trains the shared parts too: a kept epoch takes its shared
    parts along; where none is kept (here: no validation patient to judge by) the whole model comes back
    as it came, shared parts included, although they trained."""
    cfg, data, model = _onboarding(root, ("train", "val", "test"), 0.5, "train.fit_local_shared_lr_factor=0.1")
    if not judged:
        data.splits["val"] = data.splits["val"][:0]
    shared0, local0 = osteo.shared_state(model), osteo.local_state(model)
    res = fit_local(model, data, cfg, "cpu", epochs=4)
    shared1, local1 = osteo.shared_state(model), osteo.local_state(model)
    assert res["num_examples"] == len(data.splits["train"])  # it did train
    shared_moved = any(not torch.equal(v, shared1[k]) for k, v in shared0.items())
    assert (res["selected_epoch"] >= 1) == judged == shared_moved
    assert judged or all(torch.equal(v, local1[k]) for k, v in local0.items())
    if judged:
        assert evaluate(model, data, cfg, "val", "cpu")[SELECTION_METRIC] == pytest.approx(res[f"{SCORE}_selected"])


def test_final_refit_fits_only_the_local_parts_whatever_onboarding_is_set_to(root):
    """After model selection a site refits its local parts (``train.final_refit_epochs``): the shared
    parts stay the federation's even where the onboarding recipe fine-tunes them, and a refit epoch is
    kept only because the site's validation patients improved."""
    cfg, data, model = _onboarding(root, ("train", "val", "test"), 0.5, "train.fit_local_shared_lr_factor=0.1",
                                   "train.final_refit_epochs=3")
    shared0 = osteo.shared_state(model)
    before = evaluate(model, data, cfg, "val", "cpu")[SELECTION_METRIC]
    kept = final_refit(model, data, cfg, "cpu")
    assert kept >= 1 and evaluate(model, data, cfg, "val", "cpu")[SELECTION_METRIC] < before - 0.05
    assert all(torch.equal(v, osteo.shared_state(model)[k]) for k, v in shared0.items())


def test_no_final_refit_by_default(root):
    cfg, data, model = _onboarding(root, ("train", "val", "test"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert int(cfg.train.final_refit_epochs) == 0 and final_refit(model, data, cfg, "cpu") is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
