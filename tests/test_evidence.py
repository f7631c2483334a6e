"""The evidence benchmark's pipeline (osteo-evidence) end to end on tiny fake caches: the files, every method
and site, ordered intervals and paired differences. It checks the pipeline, not what the methods achieve."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from federation_helpers import SITES, make_caches, small_overrides
from osteo_model.errors import ConfigError
from osteofl.simulation import evidence


def _experiment(tmp_path: Path, **extra: str) -> Path:
    path = tmp_path / "tiny.yaml"
    lines = ["base: evidence_quick", "name: tiny", "data: as_configured", "bootstrap: 50"]
    path.write_text("\n".join([*lines, *(f"{k}: {v}" for k, v in extra.items())]) + "\n")
    return path


@pytest.mark.slow
def test_quick_experiment_writes_every_method_site_and_interval(tmp_path):
    root = make_caches(tmp_path, n_patients=24)
    result = evidence.run(str(_experiment(tmp_path)), small_overrides(root), log=lambda _: None)
    out = root / "outputs" / "tiny"
    assert (out / "evidence.md").stat().st_size > 0 and (out / "forest.png").stat().st_size > 0
    written = json.loads((out / "evidence.json").read_text())
    assert written["scenarios"].keys() == result["scenarios"].keys() == {"default"}
    sc = written["scenarios"]["default"]
    methods = set(evidence.load_experiment("evidence_quick").methods)
    assert set(sc["metrics"]) == methods and set(sc["differences"]) == methods - {"osteofl"}
    assert sc["seeds"] == [0, 1]
    groups = {*SITES, "pooled"}
    checked = 0
    for table in (sc["metrics"], sc["differences"]):
        for method, by_group in table.items():
            assert set(by_group) == groups, method
            for group, values in by_group.items():
                assert {"acc3", "auc", "mae", "r"} <= set(values), (method, group)
                for name, iv in values.items():
                    if iv["point"] is None:
                        continue
                    assert iv["lo"] <= iv["point"] <= iv["hi"], (method, group, name, iv)
                    checked += 1
    assert checked > 100
    # the BMD-free rule has no BMD metrics; every BMD-predicting method has them at every site
    assert sc["metrics"]["hu_rule"]["pooled"]["mae"]["point"] is None
    assert all(sc["metrics"][m][s]["mae"]["point"] is not None for m in methods - {"hu_rule"} for s in SITES)
    # per-device bias: one device per fake site, all three in the pooled figures
    assert {"bias_hologic", "bias_ge_lunar", "bias_norland"} <= set(sc["differences"]["fedavg"]["pooled"])
    assert np.isfinite(written["seconds"]["total"]) and written["round_seconds"]["osteofl"]
    md = (out / "evidence.md").read_text()
    assert "Paired differences" in md and "FedPer (local heads)" in md and "L1-HU rule" in md
    # a rerun trains nothing: every method's predictions of each seed were kept, and give the same figures
    lines: list[str] = []
    again = evidence.run(str(_experiment(tmp_path)), small_overrides(root), log=lines.append)
    assert sum("done earlier" in line for line in lines) == 2 * len(methods)
    assert again["scenarios"] == json.loads(json.dumps(result["scenarios"]))


def test_unknown_engine_and_reference_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: evidence_quick\nname: bad\nmethods: {x: {engine: magic}}\n")
    with pytest.raises(ConfigError, match="unknown engine"):
        evidence.load_experiment(str(bad))
    bad.write_text("base: evidence_quick\nname: bad\nreference: nobody\n")
    with pytest.raises(ConfigError, match="reference 'nobody'"):
        evidence.load_experiment(str(bad))
    with pytest.raises(ConfigError, match="no such experiment"):
        evidence.load_experiment("does_not_exist")


def test_base_experiment_keys_are_replaced_not_merged():
    quick, full = evidence.load_experiment("evidence_quick"), evidence.load_experiment("evidence")
    assert list(quick.scenarios) == ["default"] and len(full.scenarios) > 1
    assert set(quick.methods) == set(full.methods) and quick.reference == full.reference


def test_cli_prints_one_line_for_a_missing_experiment(capsys):
    assert evidence.main(["--experiment", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such experiment" in err[0]


def test_fedavg_weights_by_pool_size_and_keeps_dtypes():
    import torch

    from osteofl.simulation.evidence_methods import fedavg

    a = {"w": torch.zeros(2), "n": torch.tensor(0)}
    b = {"w": torch.full((2,), 4.0), "n": torch.tensor(4)}
    out = fedavg([(a, 1), (b, 3)])
    assert np.allclose(out["w"], 3.0) and out["w"].dtype == np.float32
    assert out["n"] == 3 and out["n"].dtype == np.int64
    assert np.allclose(fedavg([(a, 0), (b, 0)])["w"], 2.0)  # no examples anywhere: plain mean
