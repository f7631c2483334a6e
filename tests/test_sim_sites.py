"""osteo-sim's and osteo-evidence's synthetic sites (``ensure_sites``) are generated again when the synth
config they were made from changes, and reused, untouched, while it does not."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from osteo_model.config import compose
from osteofl.simulation.sim import ensure_sites

SMALL = ["synth.sites=[site_c]", "synth.labeled_per_site=2", "synth.unlabeled_per_site=1",
         "synth.labeled_external=1", "synth.unlabeled_external=0", "synth.n_jobs=1"]


def _ensure(root: Path, *overrides: str) -> list[str]:
    lines: list[str] = []
    ensure_sites(compose([f"paths.root={root}", *SMALL, *overrides]), lines.append)
    return lines


def test_sites_are_generated_again_only_when_their_synth_config_changes(tmp_path):
    studies = tmp_path / "data" / "sites" / "site_c" / "studies.csv"
    first = _ensure(tmp_path)
    assert len(first) == 2 and first[0].startswith("synthetic sites missing (site_c, site_ext)")
    assert len(pd.read_csv(studies)) == 3
    kept = studies.parent / "kept"  # a generation starts from an empty site folder: this file would go
    kept.touch()
    # the same config, and another worker count (the files do not depend on it): reused as they are
    assert _ensure(tmp_path) == [] and _ensure(tmp_path, "synth.n_jobs=2") == [] and kept.exists()
    resized = _ensure(tmp_path, "synth.labeled_per_site=4")
    assert len(resized) == 2 and "synth.labeled_per_site 2 -> 4" in resized[0], resized
    assert not kept.exists() and len(pd.read_csv(studies)) == 5
    assert _ensure(tmp_path, "synth.labeled_per_site=4") == []
    # the pairing window draws the population too
    assert "site.max_dxa_interval_days 180 -> 90" in _ensure(tmp_path, "synth.labeled_per_site=4",
                                                               "site.max_dxa_interval_days=90")[0]


def test_sites_without_a_config_record_are_generated_again(tmp_path):
    """Sites from before the record (or an interrupted generation, which never writes it) are not trusted."""
    _ensure(tmp_path)
    record = tmp_path / "data" / "ground_truth" / "sites.json"
    meta = json.loads(record.read_text())
    assert meta["config"]["synth"]["labeled_per_site"] == 2 and "n_jobs" not in meta["config"]["synth"]
    del meta["config"]
    record.write_text(json.dumps(meta))
    lines = _ensure(tmp_path)
    assert len(lines) == 2 and lines[0].startswith(f"{record} records no synth config"), lines
    assert "config" in json.loads(record.read_text()) and _ensure(tmp_path) == []
