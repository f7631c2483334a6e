import numpy as np
import pandas as pd
import pytest
import torch

from osteo_model import bmd as bmdlib
from osteo_model.calibration import CalibrationHead, check_manufacturer, t_and_category
from osteo_model.constants import HUI_1997
from osteo_model.errors import ConfigError


@pytest.mark.parametrize("manufacturer", sorted(HUI_1997))
def test_initialised_as_inverse_hui(manufacturer):
    head = CalibrationHead(manufacturer)
    sbmd = torch.linspace(0.5, 1.5, 11)
    expected = torch.tensor(bmdlib.from_sbmd(sbmd.numpy(), manufacturer), dtype=torch.float32)
    assert torch.allclose(head(sbmd), expected, atol=1e-6)
    # round trip through the forward Hui equation
    assert np.allclose(bmdlib.to_sbmd(head(sbmd).detach().numpy(), manufacturer), sbmd.numpy(), atol=1e-5)


def test_residual_learns_a_device_offset():
    head = CalibrationHead("ge_lunar")
    sbmd = torch.linspace(0.6, 1.4, 64)
    target = torch.tensor(bmdlib.from_sbmd(sbmd.numpy(), "ge_lunar"), dtype=torch.float32) + 0.05
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        loss = ((head(sbmd) - target) ** 2).mean()
        loss.backward()
        opt.step()
    assert float((head(sbmd) - target).abs().max().detach()) < 0.005


def test_fixed_head_has_no_parameters():
    assert list(CalibrationHead("hologic", learned=False).parameters()) == []


def test_category_agrees_with_t_score_thresholds_on_each_levels_reference():
    """Each vertebra is scored on its own level's reference (a woman's L1: mean 1.047 * 0.960 / 1.0525, SD
    0.125), as its labels are: the L1-L4 reference would read the same BMD 0.8 T lower."""
    mean, sd = 1.047 * 0.960 / 1.0525, 0.125
    t_wanted = np.array([0.5, -1.0, -1.01, -2.49, -2.5, -3.2])
    t, cat = t_and_category(mean + sd * t_wanted, "hologic", pd.DataFrame({"level_idx": [0] * 6, "sex": "female"}))
    assert np.allclose(t, t_wanted)
    assert cat.tolist() == [0, 0, 1, 1, 2, 2]
    l3, _ = t_and_category(np.array([0.8, 0.8]), "hologic", pd.DataFrame({"level_idx": [2, 2], "sex": ["female", None]}))
    assert l3[0] < l3[1]  # a woman's L3 reference is above the both-sexes one
    assert l3[0] == pytest.approx((0.8 - 1.047 * 1.100 / 1.0525) / 0.125)


def test_unknown_manufacturer_is_a_clear_error():
    assert check_manufacturer("GE Lunar") == "ge_lunar"
    with pytest.raises(ConfigError, match="unknown DXA manufacturer 'Acme'"):
        CalibrationHead("Acme")
