"""Issue 10's goals judged on a benchmark report's own output, so that "met" is computed, not read off by hand.

The thresholds are the experiment's ``goals:`` (configs/experiment/evidence.yaml). Each goal is judged on the
mean over seeds (the tables' point), per site where the goal is per site; the AUC goal also needs the paired
95 % interval of the reference minus the comparator to exclude a loss (lower bound >= 0).
"""
from __future__ import annotations

from typing import Any, Mapping

from osteofl.simulation.evidence_report import POOLED, device_bias_key
KEYS = ("scenarios", "against", "local", "mae_ratio", "bias_ratio", "onboarding_patients", "onboarding_auc_gap")
"""What an experiment's ``goals:`` must give."""
NUMBERS = ("mae_ratio", "bias_ratio", "onboarding_auc_gap")


def problems(goals: Mapping[str, Any]) -> list[str]:
    """What is wrong with an experiment's ``goals:`` (empty: usable), checked before an hour of training
    rather than when the report is written."""
    missing = [k for k in KEYS if goals.get(k) in (None, "", [])]
    if missing:
        return [f"{missing} missing (needs {list(KEYS)})"]
    found = []
    if not isinstance(goals["scenarios"], list) or not all(isinstance(n, str) for n in goals["scenarios"]):
        found.append(f"scenarios must be a list of scenario names, not {goals['scenarios']!r}")
    found += [f"{k} must be a number > 0, not {goals[k]!r}" for k in NUMBERS
              if isinstance(goals[k], bool) or not isinstance(goals[k], (int, float)) or goals[k] <= 0]
    if isinstance(goals["onboarding_patients"], bool) or not isinstance(goals["onboarding_patients"], int) \
            or goals["onboarding_patients"] <= 0:
        found.append(f"onboarding_patients must be a positive integer, not {goals['onboarding_patients']!r}")
    return found


def _point(entry: Mapping | None) -> float | None:
    return None if not entry else entry.get("point")


def _row(goal: str, checks: Mapping[str, tuple[float | None, float | None]], relation: str) -> dict[str, Any]:
    """One goal over its groups: each (value, bound) must satisfy ``value <= bound`` ('le') or ``>=`` ('ge');
    a group with a missing number cannot be judged, and then neither can the goal."""
    detail, verdicts = {}, []
    for group, (value, bound) in checks.items():
        ok = None if value is None or bound is None else (value <= bound if relation == "le" else value >= bound)
        verdicts.append(ok)
        detail[group] = {"value": value, "bound": bound, "met": ok}
    met = None if not verdicts or None in verdicts else all(verdicts)
    return {"goal": goal, "met": met, "groups": detail}


def judge_scenario(sc: Mapping[str, Any], goals: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The goals of one scenario's summary (evidence.json ``scenarios.<name>``)."""
    ref, other, local = sc["reference"], str(goals["against"]), str(goals["local"])
    metrics, sites = sc["metrics"], list(sc["sites"])
    missing = [m for m in (ref, other, local) if m not in metrics]
    if missing:
        return [{"goal": f"not judged: this experiment did not run {', '.join(missing)}", "met": None, "groups": {}}]
    mae = {m: {s: _point(metrics[m][s].get("mae")) for s in sites} for m in (ref, other, local)}
    ratio, bias_ratio = float(goals["mae_ratio"]), float(goals["bias_ratio"])
    rows = [
        _row(f"BMD MAE <= {ratio:g} x {other}'s at every site",
             {s: (mae[ref][s], None if mae[other][s] is None else ratio * mae[other][s]) for s in sites}, "le"),
        _row(f"BMD MAE <= {local}'s at every site", {s: (mae[ref][s], mae[local][s]) for s in sites}, "le"),
    ]
    bias = {}
    for s in sites:
        key = device_bias_key(metrics[ref], s)
        own, theirs = (_point(metrics[m][s].get(key)) if key else None for m in (ref, other))
        bias[f"{s} ({key[5:]})" if key else s] = (None if own is None else abs(own),
                                                  None if theirs is None else bias_ratio * abs(theirs))
    rows.append(_row(f"absolute Bland-Altman bias <= {bias_ratio:g} x {other}'s at every site", bias, "le"))
    auc = sc["differences"].get(other, {}).get(POOLED, {}).get("auc") or {}
    rows.append(_row(f"osteoporosis AUC >= {other}'s, paired 95 % interval excluding a loss (pooled)",
                     {"difference": (_point(auc), 0.0), "interval's lower bound": (auc.get("lo"), 0.0)}, "ge"))
    rows += _onboarding(sc, goals)
    return rows


def _onboarding(sc: Mapping[str, Any], goals: Mapping[str, Any]) -> list[dict[str, Any]]:
    """External site's AUC at the largest planned k <= the goal's patients, within the gap of the training sites'."""
    onb = sc.get("onboarding")
    if not onb:
        return []
    most, gap = int(goals["onboarding_patients"]), float(goals["onboarding_auc_gap"])
    ks = [name for name in onb["points"] if name.startswith("k") and name[1:].isdigit() and int(name[1:]) <= most]
    pooled = _point(sc["metrics"].get(onb["method"], {}).get(POOLED, {}).get("auc"))
    point = max(ks, key=lambda name: int(name[1:])) if ks else None
    value = _point(onb["points"][point]["metrics"].get("auc")) if point else None
    return [_row(f"external site's AUC after onboarding on <= {most} patients within {gap:g} of the training sites'",
                 {f"{onb['site']}, {point or f'k <= {most}'}": (value, None if pooled is None else pooled - gap)}, "ge")]


def judge(report: Mapping[str, Any], goals: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """scenario -> its goals, for the scenarios ``goals.scenarios`` names that the report has."""
    return {str(name): judge_scenario(report["scenarios"][name], goals)
            for name in goals["scenarios"] if name in report["scenarios"]}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(judged: Mapping[str, list[dict[str, Any]]], source: str) -> list[str]:
    """The goals section of evidence.md."""
    if not judged:
        return []
    lines = [f"## Goals ({source})", "",
             "Judged on this report's mean over seeds; 'value vs bound' per site (bound: the comparator's value "
             "times the goal's factor). n/a: a number the goal needs is missing.", "",
             "| scenario | goal | met | value vs bound |", "|---|---|---|---|"]
    for name, rows in judged.items():
        for row in rows:
            met = {True: "**met**", False: "not met", None: "n/a"}[row["met"]]
            detail = "; ".join(f"{g}: {_fmt(d['value'])} vs {_fmt(d['bound'])}" + ("" if d["met"] is not False else " ✗")
                               for g, d in row["groups"].items())
            lines.append(f"| `{name}` | {row['goal']} | {met} | {detail} |")
    return [*lines, ""]
