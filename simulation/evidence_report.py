"""What the evidence benchmark writes: intervals per method, site and pooled, paired differences of the
reference method against each alternative (osteo_model.evidence), as JSON, Markdown and a forest plot."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from osteo_model import evidence as ev  # noqa: E402

POOLED = "pooled"
NAMES = {"acc3": "WHO 3-class accuracy", "auc": "osteoporosis AUC", "mae": "BMD MAE g/cm2", "r": "Pearson r BMD"}
# seed -> method -> site -> patients
Runs = Mapping[int, Mapping[str, Mapping[str, ev.Patients]]]


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


def _cell(iv: Mapping) -> str:
    if iv.get("point") is None:
        return "n/a"
    if iv.get("lo") is None:
        return f"{iv['point']:.3f}"
    return f"{iv['point']:.3f} [{iv['lo']:.3f}, {iv['hi']:.3f}]"


def _metric_order(table: Mapping[str, Mapping[str, Mapping]]) -> list[str]:
    names = {k for rows in table.values() for group in rows.values() for k in group}
    return [*[k for k in NAMES if k in names], *sorted(k for k in names if k.startswith("bias_"))]


def _md_table(rows: Mapping[str, Mapping[str, Mapping]], group: str, labels: Mapping[str, str], cols: list[str]) -> list[str]:
    head = ["method", *[NAMES.get(c, c.replace("bias_", "B-A bias ")) for c in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by_group in rows.items():
        lines.append("| " + " | ".join([labels.get(name, name), *[_cell(by_group[group].get(c, {})) for c in cols]]) + " |")
    return lines


def markdown(report: dict, labels: Mapping[str, str]) -> str:
    lines = [f"# Evidence benchmark: {report['experiment']}", "",
             "Patient-level test metrics, mean over seeds with 95 % intervals (patient bootstrap within each seed, "
             "t-interval across seeds; osteo_model/evidence.py). B-A bias: predicted minus DXA patient BMD per DXA "
             "device, g/cm2. Differences are the reference method minus the alternative on the same patients "
             "(positive = reference higher; for MAE lower is better).", ""]
    for name, sc in report["scenarios"].items():
        ref = labels.get(sc["reference"], sc["reference"])
        lines += [f"## Scenario `{name}` ({len(sc['seeds'])} seeds, sites {', '.join(sc['sites'])})", ""]
        cols = _metric_order(sc["metrics"])
        for group in [POOLED, *sc["sites"]]:
            lines += [f"### {group}", "", *_md_table(sc["metrics"], group, labels, cols), ""]
        lines += [f"### Paired differences: {ref} minus each alternative", ""]
        for group in [POOLED, *sc["sites"]]:
            lines += [f"#### {group}", "", *_md_table(sc["differences"], group, labels, cols), ""]
    return "\n".join(lines)


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


def _bias_keys(sc: Mapping) -> list[str]:
    return [k for k in _metric_order(sc["differences"]) if k.startswith("bias_")]
