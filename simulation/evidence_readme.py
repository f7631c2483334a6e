"""The README's result tables from an evidence.json, so that they are rendered, not typed.

``python -m osteofl.simulation.evidence_readme docs/evidence/evidence.json [scenario ...]`` prints, per
scenario, one table per metric (methods as rows; pooled and each site as columns), the Bland-Altman bias at
each site's DXA device, and the reference minus each alternative; then the external site's onboarding
curve of those scenarios side by side. tests/test_readme_evidence.py checks that README.md carries them
exactly as the committed docs/evidence/evidence.json renders them. A row that is n/a everywhere (the L1-HU
rule predicts a category, not a BMD) is left out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping, Sequence

from osteofl.simulation.evidence import LABELS
from osteofl.simulation.evidence_onboarding import ALL, SHARED_ONLY
from osteofl.simulation.evidence_report import POOLED, cell, device_bias_key, md_table

METRIC_TABLES = (("mae", "Patient BMD MAE, g/cm²:"), ("auc", "Osteoporosis AUC (patient):"),
                 ("acc3", "WHO 3-class accuracy (patient):"))
"""One table each, and the metrics of the paired differences."""


def _rows(label: str, cells: list[str], lead: Sequence[str] = ()) -> list[list[str]]:
    """[label, *lead, *cells], or nothing where every cell is n/a."""
    return [] if all(c == "n/a" for c in cells) else [[label, *lead, *cells]]


def _device(by_site: Mapping[str, Mapping], site: str) -> str:
    """The site's DXA device, from the reference method's bias entry there."""
    key = device_bias_key(by_site, site)
    if key is None:
        raise ValueError(f"no Bland-Altman bias at {site}: the reference method has no device BMD there")
    return key.removeprefix("bias_")


def scenario_tables(name: str, sc: Mapping, labels: Mapping[str, str]) -> str:
    """The README block of scenario ``name`` (evidence.json ``scenarios[name]``)."""
    sites, metrics, diffs = list(sc["sites"]), sc["metrics"], sc["differences"]
    groups, label = [POOLED, *sites], (lambda m: labels.get(m, m))
    lines = [f"#### `{name}` ({len(sites)} sites, {len(sc['seeds'])} seeds)", ""]
    for key, title in METRIC_TABLES:
        rows = [r for m, by in metrics.items() for r in _rows(label(m), [cell(by[g].get(key, {})) for g in groups])]
        lines += [title, "", *md_table(["method", *groups], rows), ""]
    devices = {s: _device(metrics[sc["reference"]], s) for s in sites}
    rows = [r for m, by in metrics.items()
            for r in _rows(label(m), [cell(by[s].get(f"bias_{devices[s]}", {}), signed=True) for s in sites])]
    lines += ["Bland–Altman bias (predicted − DXA patient BMD, g/cm²) at each site (its one DXA device):", "",
              *md_table(["method", *(f"{s} ({devices[s]})" for s in sites)], rows), ""]
    rows = [r for m, by in diffs.items() for key, _ in METRIC_TABLES
            for r in _rows(label(m), [cell(by[g].get(key, {}), signed=True) for g in groups], lead=[key])]
    lines += [f"{label(sc['reference'])} minus each alternative on the same patients (negative MAE / positive AUC "
              "and accuracy = the reference better):", "", *md_table(["alternative", "metric", *groups], rows)]
    return "\n".join(lines)


def _onboarding_cells(point: Mapping | None) -> list[str]:
    """AUC, 3-class accuracy, MAE and MAE minus shared-only (with the seeds that kept shared-only) of one
    point of a curve; blank where the scenario has no such point (k above what its site has)."""
    if point is None:
        return ["", "", "", ""]
    kept, seeds = point.get("kept_shared_only") or [], point["seeds"]
    difference = cell(point["difference"]["mae"], signed=True) if "difference" in point else ""
    if kept:
        difference += f" (kept shared-only in {len(kept)} of {len(seeds)} seeds)"
    return [*(cell(point["metrics"].get(k, {})) for k in ("auc", "acc3", "mae")), difference]


def onboarding_table(report: Mapping, labels: Mapping[str, str], scenarios: Sequence[str]) -> str:
    """The external site's metrics against its labeled patients, the scenarios side by side, with the
    training sites' pooled figures of the curve's method below (evidence.json ``scenarios.<s>.onboarding``)."""
    curves = {n: report["scenarios"][n]["onboarding"] for n in scenarios if report["scenarios"][n].get("onboarding")}
    if not curves:
        return ""
    names = list(dict.fromkeys(k for c in curves.values() for k in c["points"]))
    names = [*(k for k in names if k != ALL), ALL]
    head = ["labeled patients", *(f"`{n}` {h}" for n in curves for h in (
        "AUC", "3-class accuracy", "BMD MAE g/cm²", "MAE minus shared-only"))]
    rows = []
    for name in names:
        points = [c["points"].get(name) for c in curves.values()]
        counts = " / ".join(f"{p['labeled_patients']['mean']:.1f}" if p else "–" for p in points)
        first = next(p for p in points if p)
        label = ("0 (shared only)" if name == SHARED_ONLY else
                 f"all the site has ({counts} on average)" if name == ALL else f"{first['labeled_patients']['mean']:.0f}")
        rows.append([label, *(c for p in points for c in _onboarding_cells(p))])
    methods = {labels.get(c["method"], c["method"]) for c in curves.values()}
    rows.append([f"training sites, pooled ({', '.join(sorted(methods))})", *(
        c for n, curve in curves.items() for c in [
            *(cell(report["scenarios"][n]["metrics"][curve["method"]][POOLED].get(k, {})) for k in ("auc", "acc3", "mae")),
            ""])])
    return "\n".join(md_table(head, rows))


def readme_tables(report: Mapping, labels: Mapping[str, str], scenarios: Sequence[str] = ()) -> str:
    """Every scenario's block (or those named), in the report's order, then their onboarding table,
    separated by a blank line."""
    names = list(scenarios) or list(report["scenarios"])
    blocks = [*(scenario_tables(n, report["scenarios"][n], labels) for n in names), onboarding_table(report, labels, names)]
    return "\n\n".join(b for b in blocks if b)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evidence_json", type=Path)
    parser.add_argument("scenarios", nargs="*")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.evidence_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        parser.error(f"{args.evidence_json}: not a readable evidence.json ({type(exc).__name__}: {exc})")
    if "scenarios" not in report:
        parser.error(f"{args.evidence_json}: no 'scenarios': not an osteo-evidence report")
    unknown = sorted(set(args.scenarios) - set(report["scenarios"]))
    if unknown:
        parser.error(f"{args.evidence_json}: no scenario {unknown}; it has {sorted(report['scenarios'])}")
    print(readme_tables(report, LABELS, args.scenarios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
