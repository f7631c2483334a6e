"""`osteo-sim` through Flower's simulation engine on tiny caches: the per-site table is complete and the
external site is onboarded with the federated shared weights."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from federation_helpers import SITES, make_caches, small_overrides
from osteo_model.config import compose
from osteo_model.errors import ConfigError, InputError
from osteofl.simulation.sim import METHODS, centralised, local_only, run_baselines, simulate


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


def test_baselines_in_worker_processes_give_the_sequential_numbers(tmp_path: Path) -> None:
    """osteo-sim trains local-only and centralised side by side in spawned processes: the same test metrics
    as the same baselines trained one after the other in this process."""
    make_caches(tmp_path, SITES)
    overrides = small_overrides(tmp_path)
    side_by_side = run_baselines({"local_only": overrides, "central": overrides})
    cfg = compose(overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as osteo-sim's process does: another thread count sums in another order
    in_turn = {"local_only": local_only(cfg, list(SITES), log=lambda _: None),
               "central": centralised(cfg, list(SITES), log=lambda _: None)}
    torch.set_num_threads(threads)
    for name, (metrics, rounds, seconds, lines) in side_by_side.items():
        assert json.dumps(metrics, sort_keys=True) == json.dumps(in_turn[name][0], sort_keys=True), name  # NaN too
        assert len(rounds) == len(in_turn[name][1]) == 2 and seconds > sum(rounds)
        assert len(lines) == 1 and "rounds" in lines[0]


def test_an_error_in_a_worker_reaches_the_parent_whole(tmp_path: Path) -> None:
    """A worker's ConfigError is rebuilt from (path, reason), not from its message (which would fail to
    unpickle and surface as a broken pool)."""
    error = pickle.loads(pickle.dumps(ConfigError(tmp_path / "site.yaml", "bad value")))
    assert type(error) is ConfigError and error.path == tmp_path / "site.yaml" and error.reason == "bad value"
    with pytest.raises(InputError, match="no prepared cache here"):
        run_baselines({"local_only": small_overrides(tmp_path / "nothing_here")})
