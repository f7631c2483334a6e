"""The README's result tables from an evidence.json, so that they are rendered, not typed.

``python -m osteofl.simulation.evidence_readme docs/evidence/evidence.json [scenario ...]`` prints, per
scenario, one table per metric (methods as rows; pooled and each site as columns), the Bland-Altman bias at
each site's DXA device, and the reference minus each alternative. tests/test_readme_evidence.py checks that
README.md carries them exactly as the committed docs/evidence/evidence.json renders them. A row that is
n/a everywhere (the L1-HU rule predicts a category, not a BMD) is left out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping, Sequence

from osteofl.simulation.evidence import LABELS
from osteofl.simulation.evidence_report import POOLED, cell

METRIC_TABLES = (("mae", "Patient BMD MAE, g/cm²:"), ("auc", "Osteoporosis AUC (patient):"),
                 ("acc3", "WHO 3-class accuracy (patient):"))
DIFFERENCE_METRICS = ("mae", "auc", "acc3")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _rows(label: str, cells: list[str], lead: Sequence[str] = ()) -> list[list[str]]:
    """[label, *lead, *cells], or nothing where every cell is n/a."""
    return [] if all(c == "n/a" for c in cells) else [[label, *lead, *cells]]


def _device(metrics: Mapping[str, Mapping], site: str) -> str:
    """The site's DXA device: its one bias entry with a value."""
    keys = [k for by_site in metrics.values() for k, iv in by_site[site].items()
            if k.startswith("bias_") and iv.get("point") is not None]
    if not keys:
        raise ValueError(f"no Bland-Altman bias at {site}: no method predicted a BMD there")
    return keys[0].removeprefix("bias_")


def scenario_tables(name: str, sc: Mapping, labels: Mapping[str, str]) -> str:
    """The README block of scenario ``name`` (evidence.json ``scenarios[name]``)."""
    sites, metrics, diffs = list(sc["sites"]), sc["metrics"], sc["differences"]
    groups, label = [POOLED, *sites], (lambda m: labels.get(m, m))
    lines = [f"#### `{name}` ({len(sites)} sites, {len(sc['seeds'])} seeds)", ""]
    for key, title in METRIC_TABLES:
        rows = [r for m, by in metrics.items() for r in _rows(label(m), [cell(by[g].get(key, {})) for g in groups])]
        lines += [title, "", *_table(["method", *groups], rows), ""]
    devices = {s: _device(metrics, s) for s in sites}
    rows = [r for m, by in metrics.items()
            for r in _rows(label(m), [cell(by[s].get(f"bias_{devices[s]}", {}), signed=True) for s in sites])]
    lines += ["Bland–Altman bias (predicted − DXA patient BMD, g/cm²) at each site (its one DXA device):", "",
              *_table(["method", *(f"{s} ({devices[s]})" for s in sites)], rows), ""]
    rows = [r for m, by in diffs.items() for key in DIFFERENCE_METRICS
            for r in _rows(label(m), [cell(by[g].get(key, {}), signed=True) for g in groups], lead=[key])]
    lines += [f"{label(sc['reference'])} minus each alternative on the same patients (negative MAE / positive AUC "
              "and accuracy = the reference better):", "", *_table(["alternative", "metric", *groups], rows)]
    return "\n".join(lines)


def readme_tables(report: Mapping, labels: Mapping[str, str], scenarios: Sequence[str] = ()) -> str:
    """Every scenario's block (or those named), in the report's order, separated by a blank line."""
    names = list(scenarios) or list(report["scenarios"])
    return "\n\n".join(scenario_tables(n, report["scenarios"][n], labels) for n in names)


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
