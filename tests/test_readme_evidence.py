"""The README's result tables are those the committed benchmark output renders (simulation/evidence_readme.py):
a retrained benchmark whose tables were not pasted again, or a hand-edited figure, fails here."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from osteofl.simulation import evidence_readme
from osteofl.simulation.evidence import LABELS

ROOT = Path(__file__).parents[1]
REPORT = json.loads((ROOT / "docs" / "evidence" / "evidence.json").read_text(encoding="utf-8"))
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("scenario", sorted(REPORT["scenarios"]))
def test_the_readme_carries_the_benchmarks_tables(scenario):
    block = evidence_readme.scenario_tables(scenario, REPORT["scenarios"][scenario], LABELS)
    assert block in README, f"README's `{scenario}` tables differ from docs/evidence/evidence.json: paste the " \
                            f"output of python -m osteofl.simulation.evidence_readme docs/evidence/evidence.json"


def test_the_readme_carries_the_onboarding_table():
    table = evidence_readme.onboarding_table(REPORT, LABELS, list(REPORT["scenarios"]))
    assert table and table in README, "README's onboarding table differs from docs/evidence/evidence.json: paste " \
                                      "the output of python -m osteofl.simulation.evidence_readme docs/evidence/evidence.json"


def test_onboarding_rows_follow_the_curves():
    """Each planned k is a row; a scenario whose site has fewer labeled patients has no point there (blank),
    and the seeds that kept shared-only are counted where there are any."""
    report = copy.deepcopy(REPORT)
    first, second = list(report["scenarios"])[:2]
    points = report["scenarios"][second]["onboarding"]["points"]
    points.pop("k20", None)
    points["k2"]["kept_shared_only"] = list(points["k2"]["seeds"])
    table = evidence_readme.onboarding_table(report, LABELS, [first, second])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert rows["20"].endswith("|  |  |  |  |")
    assert f"(kept shared-only in {len(points['k2']['seeds'])} of {len(points['k2']['seeds'])} seeds) |" in rows["2"]
    assert list(rows)[2] == "0 (shared only)" and list(rows)[-1].startswith("training sites, pooled")
    assert evidence_readme.onboarding_table(report, LABELS, [first, second]) not in README


def test_a_changed_figure_or_a_missing_method_no_longer_matches():
    name = "strong_shift"
    changed = copy.deepcopy(REPORT["scenarios"][name])
    changed["metrics"]["osteofl"]["site_b"]["mae"]["point"] += 0.001
    assert evidence_readme.scenario_tables(name, changed, LABELS) not in README
    fewer = copy.deepcopy(REPORT["scenarios"][name])
    del fewer["metrics"]["central"]
    assert evidence_readme.scenario_tables(name, fewer, LABELS) not in README


def test_rows_without_a_value_are_left_out_and_each_site_shows_its_device():
    sc = REPORT["scenarios"]["strong_shift"]
    block = evidence_readme.scenario_tables("strong_shift", sc, LABELS)
    mae_table = block.split("Osteoporosis AUC")[0]
    assert LABELS["hu_rule"] not in mae_table and LABELS["hu_rule"] in block  # a category rule has no BMD
    assert "| method | site_a (hologic) | site_b (ge_lunar) | site_c (norland) | site_d (hologic) |" in block
    fedavg = sc["differences"]["fedavg"]["pooled"]["mae"]
    assert "| " + LABELS["fedavg"] + f" | mae | {fedavg['point']:+.3f} [{fedavg['lo']:+.3f}, {fedavg['hi']:+.3f}] |" in block


def test_cli_names_the_file_it_cannot_read(tmp_path, capsys):
    bad = tmp_path / "evidence.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(SystemExit):
        evidence_readme.main([str(bad)])
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        evidence_readme.main([str(ROOT / "docs" / "evidence" / "evidence.json"), "no_such_scenario"])
    assert "no scenario ['no_such_scenario']" in capsys.readouterr().err
