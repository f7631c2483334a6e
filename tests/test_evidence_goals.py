"""Issue 10's goals judged from a report's numbers: each verdict can come out either way."""
from __future__ import annotations

from osteofl.simulation.evidence_goals import judge, markdown

GOALS = {"scenarios": ["s"], "against": "fedavg", "local": "local_only", "mae_ratio": 0.8, "bias_ratio": 0.5,
         "onboarding_patients": 20, "onboarding_auc_gap": 0.02}


def _iv(point, lo=None, hi=None):
    return {"point": point, "lo": point if lo is None else lo, "hi": point if hi is None else hi}


def _report(ours_mae_b=0.05, ours_bias_b=-0.01, auc_lo=0.01, ext_auc=0.94):
    def site(mae, bias, device):
        return {"mae": _iv(mae), "auc": _iv(0.9), f"bias_{device}": _iv(bias)}
    metrics = {
        "osteofl": {"a": site(0.04, 0.004, "hologic"), "b": site(ours_mae_b, ours_bias_b, "ge_lunar"),
                    "pooled": {"auc": _iv(0.95)}},
        "fedavg": {"a": site(0.06, -0.03, "hologic"), "b": site(0.08, 0.03, "ge_lunar"), "pooled": {"auc": _iv(0.9)}},
        "local_only": {"a": site(0.05, 0.0, "hologic"), "b": site(0.06, 0.0, "ge_lunar"), "pooled": {"auc": _iv(0.93)}},
    }
    points = {"shared_only": {"metrics": {"auc": _iv(0.8)}}, "k10": {"metrics": {"auc": _iv(0.9)}},
              "k20": {"metrics": {"auc": _iv(ext_auc)}}, "all": {"metrics": {"auc": _iv(0.99)}}}
    return {"scenarios": {"s": {
        "reference": "osteofl", "sites": ["a", "b"], "metrics": metrics,
        "differences": {"fedavg": {"pooled": {"auc": _iv(0.05, auc_lo, 0.09)}}},
        "onboarding": {"site": "ext", "method": "osteofl", "points": points}}}}


def _met(report):
    return [row["met"] for row in judge(report, GOALS)["s"]]


def test_every_goal_met_where_the_numbers_meet_it():
    assert _met(_report()) == [True, True, True, True, True]
    rows = judge(_report(), GOALS)["s"]
    assert rows[0]["groups"]["b"] == {"value": 0.05, "bound": 0.8 * 0.08, "met": True}
    assert rows[2]["groups"]["b (ge_lunar)"]["bound"] == 0.5 * 0.03  # the absolute bias, halved
    assert rows[4]["groups"] == {"ext, k20": {"value": 0.94, "bound": 0.95 - 0.02, "met": True}}  # not "all"


def test_each_goal_fails_on_its_own_number():
    assert _met(_report(ours_mae_b=0.065)) == [False, False, True, True, True]  # > 0.8 x 0.08 and > 0.06
    assert _met(_report(ours_mae_b=0.062)) == [True, False, True, True, True]  # <= 0.064, > local-only's 0.06
    assert _met(_report(ours_bias_b=0.02)) == [True, True, False, True, True]  # |0.02| > 0.5 x |0.03|
    assert _met(_report(auc_lo=-0.001)) == [True, True, True, False, True]  # the interval admits a loss
    assert _met(_report(ext_auc=0.92)) == [True, True, True, True, False]


def test_a_missing_number_is_not_judged_and_other_scenarios_are_left_out():
    report = _report()
    report["scenarios"]["s"]["metrics"]["fedavg"]["b"]["mae"] = {"point": None}
    assert _met(report)[0] is None
    report["scenarios"]["t"] = report["scenarios"]["s"]
    assert set(judge(report, GOALS)) == {"s"}
    table = "\n".join(markdown(judge(report, GOALS), "goals"))
    assert "| `s` | BMD MAE <= 0.8 x fedavg's at every site | n/a |" in table and "0.064 ✗" not in table
    assert markdown({}, "goals") == []
    del report["scenarios"]["s"]["metrics"]["local_only"]  # an experiment that selects other methods says so
    (row,) = judge(report, GOALS)["s"]
    assert row["met"] is None and row["goal"] == "not judged: this experiment did not run local_only"
