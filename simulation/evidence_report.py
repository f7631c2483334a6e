"""What the evidence benchmark writes: intervals per method, site and pooled, paired differences of the
reference method against each alternative (osteo_model.evidence), the methods' diagnostics beside the
simulated DXA bias, the round each trained method kept per site, and the external site's onboarding
curve, as JSON, Markdown, a forest plot and a curve."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from osteo_model import evidence as ev  # noqa: E402
from osteofl.simulation.evidence_diagnostics import REFIT  # noqa: E402
from osteofl.simulation.evidence_onboarding import ALL, SHARED_ONLY  # noqa: E402

POOLED = "pooled"
NAMES = {"acc3": "WHO 3-class accuracy", "auc": "osteoporosis AUC", "mae": "BMD MAE g/cm2", "r": "Pearson r BMD"}
DIAGNOSTIC_NAMES = {"gate_local": "gate weight on local expert", "calibration_shift": "calibration residual g/cm2",
                    "local_expert_shift": "local-expert shift g/cm2"}
SIMULATED_NAMES = {"device_bias": "simulated device bias g/cm2", "dxa_minus_truth": "DXA minus truth g/cm2"}
SHIFTS = ("calibration_shift", "local_expert_shift")
# seed -> method -> site -> patients
Runs = Mapping[int, Mapping[str, Mapping[str, ev.Patients]]]
# seed -> (method or point) -> site -> name -> value
Values = Mapping[int, Mapping[str, Mapping[str, Mapping[str, float]]]]


def _groups(runs: Runs, method: str, sites: Sequence[str]) -> dict[str, list[ev.Patients]]:
    """Per site and pooled: the method's patients in each seed (pooled = the sites concatenated)."""
    out: dict[str, list[ev.Patients]] = {s: [runs[seed][method][s] for seed in runs] for s in sites}
    out[POOLED] = [ev.concat([runs[seed][method][s] for s in sites]) for seed in runs]
    return out


def _combine(per_seed: list[dict[str, ev.Estimate]], difference: bool) -> dict[str, dict]:
    names = sorted({k for est in per_seed for k in est}, key=lambda k: (k.startswith("bias_"), k))
    nan = ev.Estimate(*(float("nan"),) * 4)
    return {k: ev.combine([est.get(k, nan) for est in per_seed], ev.value_range(k, difference)).as_dict() for k in names}


def summarise(runs: Runs, methods: Sequence[str], reference: str, sites: Sequence[str], n_boot: int) -> dict:
    """One scenario: ``metrics[method][site|pooled][metric]`` and ``differences[alternative][...][metric]``
    (reference minus alternative), each ``{point, lo, hi, n_seeds}``."""
    groups = {m: _groups(runs, m, sites) for m in methods}
    out: dict = {"sites": list(sites), "seeds": list(runs), "reference": reference, "metrics": {}, "differences": {}}
    for m in methods:
        out["metrics"][m] = {g: _combine([ev.within_seed(p, n_boot, seed=i) for i, p in enumerate(ps)], False)
                             for g, ps in groups[m].items()}
    for alt in methods:
        if alt != reference:
            out["differences"][alt] = {g: _combine([ev.paired(a, b, n_boot, seed=i) for i, (a, b) in enumerate(
                zip(groups[reference][g], groups[alt][g]))], True) for g in groups[reference]}
    return out


def _over_seeds(values: Sequence[float | None]) -> dict:
    """A diagnostic over seeds: the mean of its finite values and each seed's value (None where missing)."""
    clean = [float(v) if v is not None and np.isfinite(v) else None for v in values]
    finite = [v for v in clean if v is not None]
    return {"mean": float(np.mean(finite)) if finite else None, "per_seed": clean}


def summarise_diagnostics(diags: Values, simulated: Mapping[int, Mapping[str, Mapping[str, float]]],
                          averaged: Sequence[str]) -> dict:
    """``methods[method][site][name]`` (evidence_diagnostics.DIAGNOSTICS) and ``simulated[site][name]``
    (evidence_diagnostics.SIMULATED), each ``{mean, per_seed}``; ``averaged``: methods whose "local" parts
    are averaged across sites like everything else (FedAvg of the whole model), so not site-local."""
    seeds = list(diags)
    methods: dict = {}
    for method in dict.fromkeys(m for sd in seeds for m in diags[sd]):
        sites = dict.fromkeys(s for sd in seeds for s in diags[sd].get(method, {}))
        table = {s: {n: _over_seeds([diags[sd].get(method, {}).get(s, {}).get(n) for sd in seeds])
                     for n in dict.fromkeys(n for sd in seeds for n in diags[sd].get(method, {}).get(s, {}))}
                 for s in sites}
        if any(table.values()):
            methods[method] = table
    sim_sites = dict.fromkeys(s for sd in seeds for s in simulated.get(sd, {}))
    sim = {s: {n: _over_seeds([simulated.get(sd, {}).get(s, {}).get(n) for sd in seeds])
               for n in dict.fromkeys(n for sd in seeds for n in simulated.get(sd, {}).get(s, {}))} for s in sim_sites}
    return {"methods": methods, "simulated": sim, "averaged": list(averaged)}


def _finite_or_none(values: Sequence[float]) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


def summarise_selection(histories: Mapping[int, Mapping[str, Mapping[str, Sequence[float]]]],
                        selected: Mapping[int, Mapping[str, Mapping[str, int]]], metric: str) -> dict:
    """``methods[method][site]``, per seed in ``seeds``: ``task_rounds`` run, ``selected_round`` (the task
    round whose model predicted the test split; None: no round could be judged, the last was used) and
    ``val_history`` (``metric`` on the site's validation patients after each task round, lower is better);
    ``at_last_round``: the seeds whose kept round was the last one (validation still improving when
    training stopped: maybe not converged). Methods without selection (fixed rules, closed-form fits)
    have no entry."""
    methods: dict = {}
    for method in dict.fromkeys(m for sd in histories for m in histories[sd]):
        table = {}
        for site in dict.fromkeys(s for sd in histories for s in histories[sd].get(method, {})):
            have = [sd for sd in histories if site in histories[sd].get(method, {})]
            rounds = [len(histories[sd][method][site]) for sd in have]
            kept = [selected[sd][method].get(site) or None for sd in have]
            table[site] = {"seeds": have, "task_rounds": rounds, "selected_round": kept,
                           "at_last_round": [sd for sd, k, n in zip(have, kept, rounds) if k == n],
                           "val_history": [_finite_or_none(histories[sd][method][site]) for sd in have]}
        if table:
            methods[method] = table
    return {"metric": metric, "methods": methods}


def summarise_curve(preds: Mapping[int, Mapping[str, ev.Patients]], info: Values, n_boot: int) -> dict:
    """The onboarding curve: ``points[name]`` (ordered by labeled patients) with ``metrics`` like
    summarise's, ``difference`` (point minus shared-only on the same patients), and per seed the labeled
    patients used, fit_local's selected epoch and validation scores; ``kept_shared_only``: the seeds in
    which fit_local kept the shared-only local parts (no fitted epoch beat them on validation)."""
    seeds = list(preds)
    names = sorted(dict.fromkeys(n for sd in seeds for n in preds[sd]),
                   key=lambda n: max(info[sd].get(n, {}).get("labeled_patients", 0.0) for sd in seeds))
    points = {}
    for name in names:
        have = [sd for sd in seeds if name in preds[sd]]
        entry = {"seeds": have,
                 "metrics": _combine([ev.within_seed(preds[sd][name], n_boot, seed=i) for i, sd in enumerate(have)], False)}
        if name != SHARED_ONLY:
            entry["difference"] = _combine([ev.paired(preds[sd][name], preds[sd][SHARED_ONLY], n_boot, seed=i)
                                            for i, sd in enumerate(have)], True)
            entry["kept_shared_only"] = [sd for sd in have if info[sd][name].get("selected_epoch") == 0]
        for key in dict.fromkeys(k for sd in have for k in info[sd][name]):
            entry[key] = _over_seeds([info[sd][name].get(key) for sd in have])
        points[name] = entry
    return {"points": points}


def cell(iv: Mapping, signed: bool = False) -> str:
    """'point [lo, hi]' to three decimals ('n/a' without a point); ``signed``: with '+' (a difference)."""
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if iv.get("point") is None:
        return "n/a"
    if iv.get("lo") is None:
        return fmt.format(iv["point"])
    return f"{fmt.format(iv['point'])} [{fmt.format(iv['lo'])}, {fmt.format(iv['hi'])}]"


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]] = ()) -> list[str]:
    """A Markdown table's lines: header, separator, one line per row."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def device_bias_key(by_site: Mapping[str, Mapping], site: str) -> str | None:
    """The key of ``site``'s Bland-Altman bias in one method's metrics (``bias_<its DXA device>``; a site has
    one device), None where it has none."""
    return next((k for k in by_site.get(site, {}) if k.startswith("bias_")), None)


def _metric_order(table: Mapping[str, Mapping[str, Mapping]]) -> list[str]:
    names = {k for rows in table.values() for group in rows.values() for k in group}
    return [*[k for k in NAMES if k in names], *sorted(k for k in names if k.startswith("bias_"))]


def _md_table(rows: Mapping[str, Mapping[str, Mapping]], group: str, labels: Mapping[str, str], cols: list[str]) -> list[str]:
    head = ["method", *[NAMES.get(c, c.replace("bias_", "B-A bias ")) for c in cols]]
    return md_table(head, [[labels.get(name, name), *[cell(by_group[group].get(c, {})) for c in cols]]
                           for name, by_group in rows.items()])


def markdown(report: dict, labels: Mapping[str, str], first: Sequence[str] = ()) -> str:
    """evidence.md; ``first``: lines that come right after the header (the goals' verdicts)."""
    lines = [f"# Evidence benchmark: {report['experiment']}", "",
             "Patient-level test metrics, mean over seeds with 95 % intervals (patient bootstrap within each seed, "
             "t-interval across seeds; osteo_model/evidence.py; each seed's value and bootstrap SD are in evidence.json "
             "under `per_seed`), cut to what the metric can take (AUC and accuracy 0 to 1, r -1 to 1, MAE from 0). "
             "Patient BMD: mean of the levels DXA evaluated, predicted over the same levels; its T-score on those "
             "levels' young-adult reference (ISCD 2019), and its WHO category that of the T-score printed to one "
             "decimal. B-A bias: predicted minus DXA patient BMD per DXA "
             "device, g/cm2. Differences are the reference method minus the alternative on the same patients "
             "(positive = reference higher; for MAE lower is better).", ""]
    lines += first
    for name, sc in report["scenarios"].items():
        ref = labels.get(sc["reference"], sc["reference"])
        lines += [f"## Scenario `{name}` ({len(sc['seeds'])} seeds, sites {', '.join(sc['sites'])})", ""]
        cols = _metric_order(sc["metrics"])
        for group in [POOLED, *sc["sites"]]:
            lines += [f"### {group}", "", *_md_table(sc["metrics"], group, labels, cols), ""]
        lines += [f"### Paired differences: {ref} minus each alternative", ""]
        for group in [POOLED, *sc["sites"]]:
            lines += [f"#### {group}", "", *_md_table(sc["differences"], group, labels, cols), ""]
        lines += _md_diagnostics(sc.get("diagnostics"), labels)
        lines += _md_selection(sc.get("selection"), labels)
        lines += _md_onboarding(sc, labels)
    return "\n".join(lines)


def _num(entry: Mapping | None, digits: int = 3) -> str:
    value = (entry or {}).get("mean")
    return "n/a" if value is None else f"{value:.{digits}f}"


def _md_diagnostics(diag: Mapping | None, labels: Mapping[str, str]) -> list[str]:
    """Per method and site: what its local parts do on the test vertebrae, beside what was simulated."""
    if not diag or not diag["methods"]:
        return []
    lines = ["### What the site-local parts do (test vertebrae, mean over seeds)", "",
             "Gate weight on local expert: the softmax weight the gate gives the local expert. Calibration "
             "residual: predicted device BMD minus the inverse Hui 1997 of the predicted sBMD (what the "
             "calibration head learned). Local-expert shift: device BMD with minus without the local expert. "
             "Simulated device bias: the synthetic DXA device's bias x the true device BMD; DXA minus truth adds "
             "drift, degeneration, calcification and patient error. Methods marked * average their local parts "
             "across sites (not site-local).", ""]
    refit = any(REFIT in values for by_site in diag["methods"].values() for values in by_site.values())
    head = ["method", "site", *DIAGNOSTIC_NAMES.values(), *SIMULATED_NAMES.values(),
            *(["final refit: epoch kept per seed (0: none beat the selected round)"] if refit else [])]
    lines += md_table(head)
    for method, by_site in diag["methods"].items():
        name = labels.get(method, method) + (" *" if method in diag["averaged"] else "")
        for site, values in by_site.items():
            sim = diag["simulated"].get(site, {})
            kept = (values.get(REFIT) or {}).get("per_seed") or []
            lines.append("| " + " | ".join([name, site, *[_num(values.get(k)) for k in DIAGNOSTIC_NAMES],
                                             *[_num(sim.get(k)) for k in SIMULATED_NAMES],
                                             *([", ".join("n/a" if e is None else f"{e:g}" for e in kept) or "n/a"]
                                               if refit else [])]) + " |")
    return [*lines, ""]


def _md_selection(selection: Mapping | None, labels: Mapping[str, str]) -> list[str]:
    """Per trained method and site: the task round kept in each seed, and where it was the last one."""
    if not selection or not selection["methods"]:
        return []
    lines = ["### Model selection: the task round kept per site", "",
             f"Each trained method keeps, per site, the task round whose model has the lowest {selection['metric']} "
             "on the site's own validation patients, and predicts the test split with it. Kept round / rounds run, "
             "per seed; * the last round (validation still improving when training stopped: maybe not converged); "
             "n/a: no round could be judged (the last was used).", "",
             "| method | site | kept round per seed | seeds at the last round | validation score of the kept round (mean) |",
             "|---|---|---|---|---|"]
    for method, by_site in selection["methods"].items():
        for site, entry in by_site.items():
            kept = [f"{k}/{n}" + ("*" if k == n else "") if k else "n/a"
                    for k, n in zip(entry["selected_round"], entry["task_rounds"])]
            scores = [h[k - 1] for h, k in zip(entry["val_history"], entry["selected_round"]) if k]
            lines.append("| " + " | ".join([labels.get(method, method), site, ", ".join(kept),
                                             f"{len(entry['at_last_round'])} of {len(entry['seeds'])}",
                                             _num({"mean": float(np.mean(scores)) if scores else None})]) + " |")
    return [*lines, ""]


def _md_onboarding(sc: Mapping, labels: Mapping[str, str]) -> list[str]:
    """The external site's metrics against its labeled patients, beside the training sites (pooled)."""
    onb = sc.get("onboarding")
    if not onb:
        return []
    method = labels.get(onb["method"], onb["method"])
    pooled = sc["metrics"].get(onb["method"], {}).get(POOLED, {})
    sim = sc.get("diagnostics", {}).get("simulated", {}).get(onb["site"], {})
    lines = [f"### Onboarding the external site `{onb['site']}` onto {method}", "",
             ("fit_local fits only the local expert and calibration" if not onb.get("overrides") else
              f"fit_local ({', '.join(onb['overrides'])}) fits the local expert and calibration, and the shared parts")
             + " on k labeled training patients and keeps the "
             "shared-only parts unless a fitted epoch predicts the site's own validation patients better (its whole "
             "validation split, whatever k). Test patients of the external site; difference: point minus "
             "shared-only on the same patients; calibration residual and local-expert shift as above"
             + (f" (the site's simulated device bias: {_num(sim.get('device_bias'))} g/cm2)." if sim else "."), "",
             "| labeled patients | " + " | ".join(NAMES[k] for k in ("auc", "acc3", "mae")) + " | MAE minus shared-only "
             "| kept shared-only (seeds) | " + " | ".join(DIAGNOSTIC_NAMES[k] for k in SHIFTS) + " |", "|" + "---|" * 8]
    for name, point in onb["points"].items():
        kept = point.get("kept_shared_only")
        lines.append("| " + " | ".join([
            "0 (shared only)" if name == SHARED_ONLY else (
                f"all ({_num(point.get('labeled_patients'), 1)}, mean)" if name == ALL else _num(point.get("labeled_patients"), 0)),
            *[cell(point["metrics"].get(k, {})) for k in ("auc", "acc3", "mae")],
            cell(point["difference"].get("mae", {})) if "difference" in point else "",
            "" if kept is None else (", ".join(map(str, kept)) or "none"),
            *[_num(point.get(k)) for k in SHIFTS]]) + " |")
    lines.append(f"| training sites, pooled ({method}) | "
                 + " | ".join(cell(pooled.get(k, {})) for k in ("auc", "acc3", "mae")) + " | | | | |")
    return [*lines, ""]


def forest_png(path: Path, report: dict, labels: Mapping[str, str]) -> Path:
    """Pooled paired differences (reference minus each alternative) with their intervals: one row of panels
    per scenario, one panel per metric (Bland-Altman bias: one line per alternative and device)."""
    scenarios = report["scenarios"]
    panels = [*NAMES, "bias"]
    fig, axes = plt.subplots(len(scenarios), len(panels), figsize=(3.2 * len(panels), 0.5 + 0.45 * max(
        6, *(len(sc["differences"]) * max(1, len(_bias_keys(sc))) for sc in scenarios.values())) * len(scenarios)),
        squeeze=False)
    for row, (name, sc) in zip(axes, scenarios.items()):
        for ax, panel in zip(row, panels):
            keys = _bias_keys(sc) if panel == "bias" else [panel]
            items = [(f"{labels.get(alt, alt)}" + (f" · {k[5:]}" if panel == "bias" else ""), d[POOLED].get(k, {}))
                     for alt, d in sc["differences"].items() for k in keys if d[POOLED].get(k, {}).get("point") is not None]
            ys = np.arange(len(items))[::-1]
            for y, (_, iv) in zip(ys, items):
                if iv.get("point") is None:
                    continue
                lo = iv["lo"] if iv.get("lo") is not None else iv["point"]
                hi = iv["hi"] if iv.get("hi") is not None else iv["point"]
                ax.plot([lo, hi], [y, y], color="tab:blue", lw=2)
                ax.plot(iv["point"], y, "o", color="tab:blue")
            ax.axvline(0, color="grey", lw=1, ls="--")
            ax.set_yticks(ys, [label for label, _ in items], fontsize=7)
            ax.set_title(f"{name}: {NAMES.get(panel, 'B-A bias g/cm2')}", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
        row[0].set_xlabel(f"{labels.get(sc['reference'], sc['reference'])} minus alternative (pooled, 95 % CI)", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def onboarding_png(path: Path, report: dict) -> Path:
    """The external site's AUC, 3-class accuracy and MAE against its labeled patients (95 % intervals),
    one row per scenario; dashed: the training sites' pooled figure of the onboarded method."""
    scenarios = {n: sc for n, sc in report["scenarios"].items() if sc.get("onboarding")}
    panels = ("auc", "acc3", "mae")
    fig, axes = plt.subplots(len(scenarios), len(panels), figsize=(3.4 * len(panels), 2.8 * len(scenarios)), squeeze=False)
    for row, (name, sc) in zip(axes, scenarios.items()):
        onb = sc["onboarding"]
        for ax, metric in zip(row, panels):
            for point in onb["points"].values():
                iv, k = point["metrics"].get(metric, {}), point.get("labeled_patients", {}).get("mean") or 0.0
                if iv.get("point") is None:
                    continue
                lo, hi = (iv["lo"], iv["hi"]) if iv.get("lo") is not None else (iv["point"], iv["point"])
                ax.plot([k, k], [lo, hi], color="tab:blue", lw=2)
                ax.plot(k, iv["point"], "o", color="tab:blue")
            ref = sc["metrics"].get(onb["method"], {}).get(POOLED, {}).get(metric, {}).get("point")
            if ref is not None:
                ax.axhline(ref, color="grey", lw=1, ls="--", label="training sites, pooled")
                ax.legend(fontsize=6, loc="best")
            ax.set_title(f"{name}: {onb['site']} {NAMES[metric]}", fontsize=8)
            ax.set_xlabel("labeled patients (0 = shared only)", fontsize=7)
            ax.tick_params(labelsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bias_keys(sc: Mapping) -> list[str]:
    return [k for k in _metric_order(sc["differences"]) if k.startswith("bias_")]
