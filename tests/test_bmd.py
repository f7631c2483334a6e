"""BMD arithmetic against the published equations and thresholds."""
import math

import numpy as np
import pytest

from osteo_model import bmd
from osteo_model.constants import HUI_1997, LEVEL_REFERENCE_BMD, LEVELS, YOUNG_ADULT_REFERENCE


@pytest.mark.parametrize("manufacturer", sorted(HUI_1997))
def test_hui_roundtrip(manufacturer: str) -> None:
    device = np.linspace(0.5, 1.5, 11)
    np.testing.assert_allclose(bmd.from_sbmd(bmd.to_sbmd(device, manufacturer), manufacturer), device)


def test_hui_values_from_paper() -> None:
    # Hui 1997: sBMD = 1.0550 (Hologic - 0.972) + 1.0436; = 0.9683 (Lunar - 1.100) + 1.0436
    assert bmd.to_sbmd(0.972, "hologic") == pytest.approx(1.0436)
    assert bmd.to_sbmd(1.2, "ge_lunar") == pytest.approx(0.9683 * 0.1 + 1.0436)
    # The same patient reads higher on Lunar than on Hologic (Fan 2010: Hologic ~11.7 % lower).
    s = 0.9
    assert bmd.from_sbmd(s, "ge_lunar") > bmd.from_sbmd(s, "hologic")


def test_young_adult_lunar_matches_published_reference() -> None:
    mean, sd = YOUNG_ADULT_REFERENCE["ge_lunar"]
    assert mean == pytest.approx(1.18, abs=0.01) and sd == pytest.approx(0.12, abs=0.01)


def test_who_categories_at_thresholds() -> None:
    t = np.array([-2.6, -2.5, -2.49, -1.01, -1.0, 0.5, np.nan])
    assert bmd.category_from_t(t).tolist() == [2, 2, 1, 1, 0, 0, -1]
    assert bmd.category_from_t(-3.0) == 2
    assert bmd.category_name(1) == "osteopenia"


def test_the_category_a_reader_sees_is_that_of_the_printed_t_score():
    """ISCD reports T to one decimal: "T -2.5" must read osteoporosis although -2.46 > -2.5, and "T -1.0"
    normal although -1.04 < -1.0."""
    t = np.array([-2.46, -2.54, -1.06, -1.04, -0.96, np.nan])
    assert [f"{v:.1f}" for v in bmd.reported_t(t)] == ["-2.5", "-2.5", "-1.1", "-1.0", "-1.0", "nan"]
    assert bmd.reported_category(t).tolist() == [2, 2, 1, 0, 0, -1]  # a printed -1.0 is normal (T >= -1.0)
    assert bmd.category_from_t(t).tolist() == [1, 2, 1, 1, 0, -1]  # the unrounded rule training labels use
    assert bmd.reported_category(-2.46) == 2 and isinstance(bmd.reported_t(-2.46), float)
    assert bmd.reported_t(np.zeros((2, 0))).shape == (2, 0)


def test_t_score_on_device_reference() -> None:
    mean, sd = YOUNG_ADULT_REFERENCE["hologic"]
    assert bmd.t_score(mean - 2.5 * sd, "hologic") == pytest.approx(-2.5)


def test_manufacturer_spellings() -> None:
    assert bmd.normalise_manufacturer(" GE Lunar ") == "ge_lunar"
    assert bmd.normalise_manufacturer("HOLOGIC") == "hologic"
    assert bmd.normalise_manufacturer("Acme DXA") is None


def test_patient_level_rule_needs_two_levels() -> None:
    assert bmd.patient_bmd([0.8, float("nan"), 1.0, None]) == pytest.approx(0.9)
    assert math.isnan(bmd.patient_bmd([0.8, float("nan"), float("nan"), float("nan")]))


def test_each_level_and_each_combination_reads_on_its_own_reference() -> None:
    """A normal young woman whose vertebrae follow the reference pattern (L1 least dense) reads T 0 at
    every level and with L1 excluded. On the L1-L4 reference alone her L1 would read about 1.3 T below her
    L3, her categories would differ by level for no clinical reason, and excluding L1 would raise her."""
    mean = YOUNG_ADULT_REFERENCE["hologic"][0]
    ref = LEVEL_REFERENCE_BMD["female"]
    density = {lv: mean * ref[lv] / np.mean([ref[k] for k in LEVELS]) for lv in LEVELS}
    for lv in LEVELS:
        assert bmd.region_t_score(density[lv], [lv], "hologic", "female") == pytest.approx(0.0, abs=1e-9)
    assert bmd.t_score(density["L3"], "hologic") - bmd.t_score(density["L1"], "hologic") > 1.2  # the L1-L4 reference's own bias
    rest = ["L2", "L3", "L4"]
    assert bmd.region_t_score(np.mean([density[lv] for lv in rest]), rest, "hologic", "female") == pytest.approx(0.0, abs=1e-9)
    assert bmd.t_score(np.mean([density[lv] for lv in rest]), "hologic") > 0.25
    assert bmd.region_t_score(0.9, LEVELS, "ge_lunar", "male") == pytest.approx(bmd.t_score(0.9, "ge_lunar"))  # all four: L1-L4
    male, female = (bmd.region_t_score(0.9, ["L1"], "hologic", s) for s in ("male", "female"))
    assert min(male, female) < bmd.region_t_score(0.9, ["L1"], "hologic", "") < max(male, female)  # sex unknown: between


def test_one_vertebras_t_score_uses_one_vertebras_sd():
    """clinical.md: a single level's young-adult SD is 0.12-0.13 g/cm^2, wider than the L1-L4 mean's 0.110:
    with the L1-L4 SD a woman's L3 of 0.80 read T -2.68 (osteoporosis) instead of about -2.4."""
    from osteo_model.constants import LEVEL_REFERENCE_SD

    sd = YOUNG_ADULT_REFERENCE["hologic"][1]
    factors = [bmd.region_sd_factor(k) for k in (1, 2, 3, 4)]
    assert factors[0] * sd == pytest.approx(LEVEL_REFERENCE_SD) and factors[3] == pytest.approx(1.0)
    assert factors[0] > factors[1] > factors[2] > factors[3]  # a mean of more levels varies less
    t_l3 = bmd.region_t_score(0.80, ["L3"], "hologic", "female")
    share = LEVEL_REFERENCE_BMD["female"]["L3"] / np.mean(list(LEVEL_REFERENCE_BMD["female"].values()))
    assert t_l3 == pytest.approx((0.80 - YOUNG_ADULT_REFERENCE["hologic"][0] * share) / LEVEL_REFERENCE_SD)
    assert -2.5 < t_l3 < -2.3
    # the SD scales with the manufacturer's own L1-L4 SD
    assert bmd.region_t_score(0.9, ["L2"], "ge_lunar", "male") * YOUNG_ADULT_REFERENCE["ge_lunar"][1] * factors[0] == \
        pytest.approx(0.9 - YOUNG_ADULT_REFERENCE["ge_lunar"][0] * LEVEL_REFERENCE_BMD["male"]["L2"]
                      / np.mean(list(LEVEL_REFERENCE_BMD["male"].values())))
