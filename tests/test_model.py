import numpy as np
import pytest
import torch

from osteo_model import bmd as bmdlib, model as osteo
from osteo_model.constants import LEVELS
from osteo_model.errors import StateError

from model_helpers import run, tiny_cfg


@pytest.fixture
def cfg(tmp_path):
    return tiny_cfg(tmp_path)


def _x(n=3, s=16):
    return torch.randn(n, 2, s, s, s, generator=torch.Generator().manual_seed(1))


def test_shared_and_local_partition_state_dict(cfg):
    m = osteo.build_model(cfg, 6, "hologic")
    shared, local = set(osteo.shared_keys(m)), set(osteo.local_keys(m))
    assert shared and local and not shared & local
    assert shared | local == set(m.state_dict())
    assert not any(k.startswith("feature_norm.") for k in shared)  # feature moments never leave a site
    assert {k.split(".")[0] for k in local} == {"local_expert", "calibration", "feature_norm"}
    n_local = sum(p.numel() for p in osteo.local_parameters(m))
    n_shared = sum(p.numel() for p in osteo.shared_parameters(m))
    assert n_local + n_shared == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("overrides", [[], ["model=resnet", "model.channels=[8,8,8,8]", "model.embed_dim=16"]])
def test_no_batchnorm_and_forward_shapes(tmp_path, overrides):
    m = osteo.build_model(tiny_cfg(tmp_path, *overrides), 6, "ge_lunar")
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    out = run(m, _x())
    assert out["ssl"].shape == (3, 6) and out["diagnosis"].shape == (3, 3) and out["level"].shape == (3, 4)
    assert out["sbmd"].shape == out["bmd"].shape == (3,)
    assert torch.allclose(out["gate"].sum(1), torch.ones(3))



def test_shared_state_roundtrip_between_sites(cfg):
    a, b = osteo.build_model(cfg, 6, "hologic"), osteo.build_model(cfg.copy(), 6, "norland")
    with torch.no_grad():
        for p in osteo.shared_parameters(a):
            p.add_(0.1)
    arrays = {k: v.numpy() for k, v in osteo.shared_state(a).items()}
    osteo.load_shared(b, arrays)
    for k, v in osteo.shared_state(b).items():
        assert torch.equal(v, osteo.shared_state(a)[k])
    assert b.manufacturer == "norland"  # local part untouched


def test_load_shared_rejects_wrong_keys_and_shapes(cfg):
    m = osteo.build_model(cfg, 6, "hologic")
    state = osteo.shared_state(m)
    with pytest.raises(StateError, match="missing"):
        osteo.load_shared(m, {k: v for k, v in list(state.items())[1:]})
    with pytest.raises(StateError, match="unexpected"):
        osteo.load_shared(m, {**state, **osteo.local_state(m)})
    key = next(iter(state))
    with pytest.raises(StateError, match="shape"):
        osteo.load_shared(m, {**state, key: np.zeros((1, 2, 3))})
    with pytest.raises(StateError):
        osteo.load_local(m, state)


def test_new_site_prediction_is_the_shared_mixture(cfg):
    """An untrained local expert contributes nothing, whatever its hidden layer holds."""
    m = osteo.build_model(cfg, 6, "hologic").eval()
    x = _x()
    before = run(m, x)["sbmd"]
    with torch.no_grad():
        m.local_expert[0].weight.normal_()
        m.gate[2].bias[-1] = 3.0  # even with a large local gate weight
    assert torch.allclose(run(m, x)["sbmd"], before, atol=1e-6)
    with torch.no_grad():
        m.local_expert[2].weight.normal_()
    assert not torch.allclose(run(m, x)["sbmd"], before, atol=1e-4)


def test_site_models_share_shared_modules_only(cfg):
    models = osteo.build_site_models(cfg, 6, {"a": "hologic", "b": "ge_lunar"})
    assert models["a"].encoder is models["b"].encoder and models["a"].heads is models["b"].heads
    assert models["a"].local_expert is not models["b"].local_expert
    assert models["b"].calibration.manufacturer == "ge_lunar"


def test_no_moe_variant_has_only_feature_norm_local(tmp_path):
    m = osteo.build_model(tiny_cfg(tmp_path, "model.moe=false", "model.calibration=fixed"), 6, "hologic")
    assert osteo.local_keys(m) == ["feature_norm.mean", "feature_norm.std"] and not hasattr(m, "gate")
    assert run(m, _x())["gate"].shape == (3, 1)


def test_feature_stats_standardise(cfg):
    m = osteo.build_model(cfg, 2, "hologic")
    f = np.array([[1.0, 10.0], [3.0, 10.0], [np.nan, 10.0]])
    osteo.set_feature_stats(m, *osteo.feature_stats(f))
    z = m.feature_norm(torch.tensor([[3.0, 10.0], [float("nan"), 1e9]]))
    assert torch.allclose(z, torch.tensor([[1.0, 0.0], [0.0, osteo.FEATURE_CLIP]]))


@pytest.mark.parametrize("manufacturer", ["hologic", "ge_lunar"])
def test_untrained_diagnosis_agrees_with_the_t_score(cfg, manufacturer):
    """The head is anchored on the calibrated T-score on the vertebra's own level (and sex) reference, the
    one its labels are on: before any training its argmax is the WHO category of that T-score, the same
    crop reads differently as a woman's L1 and her L3, and P(osteoporosis) falls as the T-score rises."""
    net = osteo.build_model(cfg, 5, manufacturer).eval()
    x = torch.cat([_x(4), _x(1).expand(3, -1, -1, -1, -1)])  # the last three: one crop, three readings
    levels, sexes = ["L1", "L2", "L3", "L4", "L1", "L3", "L3"], ["female", "male", "", "female", "female", "female", ""]
    with torch.no_grad():
        out = net(x, torch.tensor([LEVELS.index(lv) for lv in levels]), torch.tensor(bmdlib.sex_codes(sexes)))
    t = bmdlib.level_t_score(out["bmd"].numpy(), [LEVELS.index(lv) for lv in levels], manufacturer, sexes)
    assert torch.allclose(out["diagnosis"], osteo.who_category_logits(torch.tensor(t, dtype=torch.float32)), atol=1e-5)
    assert torch.softmax(out["diagnosis"], 1).argmax(1).tolist() == bmdlib.category_from_t(t).tolist()
    assert out["bmd"][4] == out["bmd"][6] and t[4] > t[6] > t[5]  # L1's reference is the lowest, a woman's L3 the highest
    grid = torch.linspace(-4.0, 1.0, 21)
    p_osteo = torch.softmax(osteo.who_category_logits(grid), 1)[:, 2]
    assert torch.all(p_osteo[1:] < p_osteo[:-1])
    assert p_osteo[0] > 0.99 and p_osteo[-1] < 0.01
