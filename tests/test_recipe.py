"""One training recipe everywhere: central training, the simulation baselines and the ClientApp build the
same optimiser groups, learning rates, schedule and sBMD prior from the same config."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from federation_helpers import LocalGrid, make_caches, small_overrides
from osteo_model import model as osteo, training
from osteo_model.central import load_sites, train_central
from osteo_model.config import compose
from osteo_model.model import SBMD_CENTER, SBMD_SCALE
from osteofl.client.client_app import make_client_app
from osteofl.server.server_app import Federation
from osteofl.simulation import sim

PLAN = ["federation.ssl_rounds=1", "federation.task_rounds=2", "train.ssl_epochs=1", "train.task_epochs=2",
        "federation.local_steps=1", "train.local_lr_factor=7.0", "train.lr=2e-3"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_caches(tmp_path_factory.mktemp("recipe"))


@pytest.fixture
def spy(monkeypatch) -> list[tuple]:
    """Every Recipe.begin: (phase, index, ((role, lr, n parameters) per group), sBMD head bias after)."""
    calls: list[tuple] = []
    begin = training.Recipe.begin

    def recording(self, phase, index):
        begin(self, phase, index)
        groups = tuple((g["role"], round(g["lr"], 12), sum(p.numel() for p in g["params"]))
                       for g in self.optimizer.param_groups)
        bias = float(osteo.unwrap(next(iter(self.models.values()))).heads["sbmd"].bias.item())
        calls.append((phase, index, groups, bias))

    monkeypatch.setattr(training.Recipe, "begin", recording)
    return calls


def _cfg(root: Path, *extra: str):
    return compose([*small_overrides(root), *PLAN, "train.sites=[site_a,site_b]", *extra])


def test_recipe_groups_schedule_prior_and_stale_state(root):
    cfg = _cfg(root)
    datas = load_sites(cfg, ["site_a", "site_b"])
    models = osteo.build_site_models(cfg, datas["site_a"].cache.features.shape[1],
                                     {s: d.manufacturer for s, d in datas.items()})
    recipe = training.Recipe(models, cfg, training.phase_lengths(cfg, federated=False), datas)
    roles = [g["role"] for g in recipe.optimizer.param_groups]
    assert roles == ["shared", "local", "local"]
    shared = {id(p) for p in osteo.shared_parameters(models["site_b"])}
    assert {id(p) for p in recipe.optimizer.param_groups[0]["params"]} == shared  # shared modules taken once
    lrs = {}
    for phase, index in [("ssl", 0), ("task", 0), ("task", 1)]:
        recipe.begin(phase, index)
        lrs[phase, index] = [g["lr"] for g in recipe.optimizer.param_groups]
    assert lrs["task", 0] == pytest.approx([2e-3, 7 * 2e-3, 7 * 2e-3])
    assert lrs["task", 1] == pytest.approx([1e-3, 7e-3, 7e-3])  # cosine: half-way through a 2-step phase
    pooled = np.concatenate([d.cache.table["sbmd"].to_numpy(float)[d.splits["train"]] for d in datas.values()])
    bias = float(models["site_a"].heads["sbmd"].bias.item())
    assert bias == pytest.approx((np.nanmean(pooled) - SBMD_CENTER) / SBMD_SCALE, abs=1e-5)
    assert bias != 0.0
    # an optimizer state with another group layout (an older version's single group) is not forced in
    stale = torch.optim.AdamW(list(models["site_a"].parameters())).state_dict()
    assert not recipe.restore(stale)
    assert recipe.restore(recipe.optimizer.state_dict())
    assert [g["role"] for g in recipe.optimizer.param_groups] == roles


def test_cosine_factor_decays_over_a_phase():
    f = [training.cosine_factor(i, 5) for i in range(5)]
    assert f[0] == 1.0 and all(a > b for a, b in zip(f, f[1:])) and f[-1] > 0
    assert training.index_in_phase(compose(["federation.ssl_rounds=2"]), "task", 3) == 0


@pytest.mark.slow
def test_central_simulation_and_client_build_the_same_groups(root, tmp_path, spy, task_identity):
    pair = ["site_a", "site_b"]
    cfg = _cfg(root, f"federation.sites=[{','.join(pair)}]")
    train_central(cfg, load_sites(cfg, pair), tmp_path / "central", log=lambda _: None)
    central = [c[:3] for c in spy]
    spy.clear()
    sim.centralised(cfg, pair, log=lambda _: None)
    assert [c[:3] for c in spy] == central
    assert [c[0:2] for c in central] == [("ssl", 0), ("task", 0), ("task", 1)]
    assert central[2][2][0][1] < central[1][2][0][1]  # the schedule decays within the task phase
    spy.clear()
    sim.local_only(cfg, pair, log=lambda _: None)
    local_only = [c[:3] for c in spy]
    spy.clear()
    overrides = [*small_overrides(root), *PLAN, f"federation.sites=[{','.join(pair)}]",
                 f"paths.state_root={tmp_path / 'state'}", f"paths.outputs={tmp_path / 'fed'}"]
    Federation(LocalGrid(make_client_app(overrides), pair), compose(overrides)).run()
    client = [c[:3] for c in spy]
    assert sorted(client) == sorted(local_only)
    # one site alone and one site in the pool get the same shared and local group
    assert {(p, i, g[:2]) for p, i, g in client} == {(p, i, g[:2]) for p, i, g in central}
    # the prior is set at the first task round of each site: its own training mean, not SBMD_CENTER
    first_task = [c[3] for c in spy if c[:2] == ("task", 0)]
    assert len(first_task) == len(pair) and all(b != 0.0 for b in first_task)
