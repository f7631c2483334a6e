"""`osteo-sim` through Flower's simulation engine on tiny caches: the per-site table is complete and the
external site is onboarded with the federated shared weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from federation_helpers import SITES, make_caches, small_overrides
from osteofl.simulation.sim import METHODS, simulate


@pytest.mark.slow
def test_simulation_table_and_onboarding(tmp_path: Path) -> None:
    make_caches(tmp_path, {**SITES, "site_ext": "hologic"})
    lines: list[str] = []
    report = simulate(small_overrides(tmp_path, **{"synth.external_site": "site_ext",
                                                   "federation.onboard_labeled_patients": 3}),
                      log=lines.append, prepare=False)
    assert set(report["results"]) == set(METHODS)
    for method in METHODS:
        assert set(report["results"][method]) == set(SITES), method
        assert all(0.0 <= m["mae_bmd"] < 1.0 for m in report["results"][method].values())
    ext = report["external"]
    assert ext["onboarding_labeled_vertebrae"] > 0 and ext["before_onboarding"] != ext["after_onboarding"]
    assert report["payload"]["shared_bytes"] < report["payload"]["whole_model_bytes"]
    saved = json.loads((tmp_path / "outputs" / "sim" / "report.json").read_text())
    assert saved["payload"] == report["payload"]
    assert any("upload per site per round" in line for line in lines)
    text = "\n".join(lines)  # patient-level endpoints first, and the demo says it is not the evidence
    assert "Conclusions come from the benchmark" in text
    assert text.index("patient AUC (T-score)") < text.index("vertebra AUC (T-score)")
    assert all(m["patient_n"] > 0 and 0.0 <= m["patient_mae_bmd"] < 1.0 for m in report["results"]["osteofl"].values())
    assert ext["after_onboarding"]["selected_epoch"] >= 0
