"""osteo-prepare end to end on tiny synthetic sites: cache, incremental re-runs, quarantine."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import LEVEL_Z0, write_dicom_series
from osteo_model.cache import SiteCache
from osteo_model.cli.prepare import main as prepare_main
from osteo_model.constants import LEVELS
from osteo_model.prepare import load_studies, prepare_site


def quarantine(cfg) -> pd.DataFrame:
    return pd.read_csv(f"{cfg.site.cache_dir}/quarantine.csv", dtype=str, keep_default_na=False)


def entries(cfg) -> set[str]:
    return {p.name for p in (Path(cfg.site.cache_dir) / "entries").glob("*.npz")}


def test_round_trip_and_labels(make_site, prepare_cfg):
    site = make_site(n_labeled=2, n_unlabeled=1)
    cfg = prepare_cfg(site)
    summary = prepare_site(cfg, progress=False)
    assert (summary.prepared, summary.cached, summary.quarantined) == (3, 0, 0)
    cache = SiteCache.open(cfg.site.cache_dir)
    assert len(cache) == 12 and cache.crops.shape == (12, 32, 32, 32) and cache.masks.shape == (12, 32, 32, 32)
    assert cache.features.shape == (12, len(cache.feature_names)) and np.isfinite(cache.features).all()
    t = cache.table
    assert list(t["level"]) == list(LEVELS) * 3 and list(t["level_idx"]) == [0, 1, 2, 3] * 3
    assert list(t["labeled"]) == [True] * 8 + [False] * 4
    assert t.loc[0, "bmd"] == pytest.approx(0.80) and t.loc[4, "bmd"] == pytest.approx(0.85)
    assert t.loc[0, "dxa_manufacturer"] == "hologic" and t.loc[0, "interval_days"] == 19
    assert t.loc[0, "category"] == 1 and np.isnan(t.loc[8, "bmd"]) and t.loc[8, "category"] == -1
    # Phantom studies differ by 20 HU of trabecular density: the statistics see it.
    assert t.groupby("study_id")["hu_mean"].mean().diff().dropna().between(12, 28).all()
    assert cache.manifest["dxa_manufacturer"] == "hologic" and cache.manifest["n_labeled"] == 8
    assert quarantine(cfg).empty


def test_rerun_is_cached_and_redoes_what_changed(make_site, prepare_cfg):
    site = make_site(n_labeled=1, n_unlabeled=2)
    cfg = prepare_cfg(site)
    prepare_site(cfg, progress=False)
    first = entries(cfg)
    again = prepare_site(cfg, progress=False)
    assert (again.prepared, again.cached) == (0, 3) and entries(cfg) == first
    # One input file changes -> only that study is redone; its old entry is left out of the cache.
    ct = sitk.ReadImage(str(site / "ct/s001.nii.gz"))
    sitk.WriteImage(ct + 10, str(site / "ct/s001.nii.gz"))
    changed = prepare_site(cfg, progress=False)
    assert (changed.prepared, changed.cached) == (1, 2)
    assert len(entries(cfg)) == 4 and len(SiteCache.open(cfg.site.cache_dir)) == 12
    # A setting that shapes the entries -> everything redone.
    redone = prepare_site(prepare_cfg(site, "crop.trabecular_erosion_mm=2.0"), progress=False)
    assert (redone.prepared, redone.cached) == (3, 0)
    # The DXA pairing is part of a study's key: a new DXA row redoes that study only.
    dxa = pd.read_csv(site / "dxa.csv")
    row = dxa.iloc[0].copy()
    row["patient_id"], row["dxa_date"] = "p002", "2024-04-01"
    pd.concat([dxa, row.to_frame().T]).to_csv(site / "dxa.csv", index=False)
    relabeled = prepare_site(cfg, progress=False)
    assert (relabeled.prepared, relabeled.cached) == (1, 2)
    assert SiteCache.open(cfg.site.cache_dir).table["labeled"].sum() == 8


def test_cached_entries_take_todays_label_rule_without_recomputing_crops(make_site, prepare_cfg):
    """A label rule is not the crop's: an entry written under an older one (here: its labels overwritten
    with a wrong category and T-score) is still reused, and the cache carries the labels of today's rule."""
    site = make_site(n_labeled=2, n_unlabeled=1)
    cfg = prepare_cfg(site)
    prepare_site(cfg, progress=False)
    labels = ["t_score", "category", "labeled"]
    before = SiteCache.open(cfg.site.cache_dir).table[labels].copy()
    for path in (Path(cfg.site.cache_dir) / "entries").glob("*.npz"):
        with np.load(path) as z:
            parts = {k: z[k] for k in z.files}
        rows = json.loads(str(parts["rows"]))
        parts["rows"] = np.array(json.dumps([{**r, "t_score": -9.0, "category": 2} for r in rows]))
        np.savez(path, **parts)
    again = prepare_site(cfg, progress=False)
    assert (again.prepared, again.cached) == (0, 3)
    after = SiteCache.open(cfg.site.cache_dir).table[labels]
    pd.testing.assert_frame_equal(after, before)
    assert (after["category"] == 2).sum() < len(after) and after["t_score"].min() > -9


def test_half_written_entry_is_ignored(make_site, prepare_cfg):
    site = make_site(n_labeled=1, n_unlabeled=0)
    cfg = prepare_cfg(site)
    prepare_site(cfg, progress=False)
    entry_dir = Path(cfg.site.cache_dir) / "entries"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a writer killed before os.replace: its temporary stays, and its pid runs no more
    (entry := next(entry_dir.glob("*.npz"))).rename(entry_dir / f".{entry.name}.tmp-{child.pid}")
    summary = prepare_site(cfg, progress=False)
    assert (summary.prepared, summary.cached) == (1, 0) and len(SiteCache.open(cfg.site.cache_dir)) == 4
    assert not list(entry_dir.glob(".*.tmp-*")), "the dead writer's temporary entry was left behind"


def test_parallel_radiomics_matches_serial(make_site, prepare_cfg):
    site = make_site(n_labeled=1, n_unlabeled=1)
    serial = prepare_cfg(site)
    prepare_site(serial, progress=False)
    parallel = prepare_cfg(site, f"site.cache_dir={serial.site.cache_dir}_par", "radiomics.n_jobs=2")
    prepare_site(parallel, progress=False)
    a, b = SiteCache.open(serial.site.cache_dir), SiteCache.open(parallel.site.cache_dir)
    assert a.feature_names == b.feature_names
    np.testing.assert_array_equal(a.features, b.features)


def _relabel(path, fn):
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    fn(arr)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path))


def drop_l3(a: np.ndarray) -> None:
    a[a == 29] = 0


def l1_to_scan_edge(a: np.ndarray) -> None:
    a[LEVEL_Z0["L1"]:, 6:18, 10:26] = 31  # L1's body now runs into the last slice


def tiny_l2(a: np.ndarray) -> None:
    a[a == 30] = 0
    a[LEVEL_Z0["L2"] + 5, 10, 17] = 30


def test_every_bad_input_is_quarantined_the_rest_kept(make_site, prepare_cfg):
    site = make_site(n_labeled=9, n_unlabeled=2)
    cfg = prepare_cfg(site)
    # s000: unreadable file; s001: truncated file
    (site / "ct/s000.nii.gz").write_bytes(gzip.compress(b"garbage" * 100))
    data = (site / "ct/s001.nii.gz").read_bytes()
    (site / "ct/s001.nii.gz").write_bytes(data[: len(data) // 2])
    # s002: label map not in the CT's space
    lab = sitk.ReadImage(str(site / "labels/s002.nii.gz"))
    lab.SetSpacing((2.0, 2.0, 3.0))
    sitk.WriteImage(lab, str(site / "labels/s002.nii.gz"))
    # s003: CT in raw stored values (no rescale)
    ct = sitk.ReadImage(str(site / "ct/s003.nii.gz"))
    sitk.WriteImage(ct + 1024, str(site / "ct/s003.nii.gz"))
    # s004: L3 missing from the mask; s005: L1 cut by the scan edge; s006: L2 tiny
    _relabel(site / "labels/s004.nii.gz", drop_l3)
    _relabel(site / "labels/s005.nii.gz", l1_to_scan_edge)
    _relabel(site / "labels/s006.nii.gz", tiny_l2)
    # s007: DXA row of an unknown device; s008: DXA 400 days away; s009 (unlabeled): absurd BMD row;
    # s010: duplicate DXA key; plus a DXA row whose BMDs are all missing.
    dxa = pd.read_csv(site / "dxa.csv", dtype=str, keep_default_na=False)
    dxa.loc[7, "manufacturer"] = "Acme Bone"
    dxa.loc[8, "dxa_date"] = "2025-04-04"
    extra = pd.DataFrame([
        {**dxa.iloc[0].to_dict(), "patient_id": "p009", "bmd_l1": "12", "bmd_l2": "11", "bmd_l3": "13", "bmd_l4": "14"},
        {**dxa.iloc[0].to_dict(), "patient_id": "p010"},
        {**dxa.iloc[0].to_dict(), "patient_id": "p010", "bmd_l1": "0.7"},
        {**dxa.iloc[0].to_dict(), "patient_id": "p099", "bmd_l1": "", "bmd_l2": "", "bmd_l3": "", "bmd_l4": ""},
    ])
    pd.concat([dxa, extra]).to_csv(site / "dxa.csv", index=False)
    # s011: a study row pointing to a missing file
    studies = pd.read_csv(site / "studies.csv", dtype=str)
    studies.loc[len(studies)] = ["s011", "p011", "2024-03-01", "ct/nope.nii.gz", "labels/s000.nii.gz", ""]
    studies.to_csv(site / "studies.csv", index=False)

    summary = prepare_site(cfg, progress=False)
    q = quarantine(cfg)
    reasons = {(r.case, r.level, r.action): (r.file, r.reason) for r in q.itertuples()}

    def find(case, action="quarantined", level=""):
        return reasons[(case, level, action)]

    assert find("s000")[0] == "ct/s000.nii.gz"
    assert find("s001") == ("ct/s001.nii.gz", "unreadable or truncated image (file shorter than its header says)")
    assert find("s002")[0] == "labels/s002.nii.gz" and "spacing" in find("s002")[1]
    assert find("s003")[0] == "ct/s003.nii.gz" and "Hounsfield" in find("s003")[1]
    assert "missing" in find("s004", "level_excluded", "L3")[1]
    assert "truncated" in find("s005", "level_excluded", "L1")[1]
    assert "tiny" in find("s006", "level_excluded", "L2")[1]
    assert "unknown DXA device" in find("dxa.csv line 9")[1]
    assert "limit 180" in find("s008", "unlabeled")[1]
    assert "no usable BMD" in find("dxa.csv line 11")[1] and "implausible" in find("dxa.csv line 11", "value_dropped", "L1")[1]
    assert "duplicate key" in find("dxa.csv line 12")[1] and "duplicate key" in find("dxa.csv line 13")[1]
    assert "no usable BMD" in find("dxa.csv line 14")[1]
    assert find("s011") == ("ct/nope.nii.gz", "file not found")
    assert summary.quarantined == 5 and summary.dxa_rows_quarantined == 5 and summary.excluded_levels == 3

    cache = SiteCache.open(cfg.site.cache_dir)
    per_study = cache.table.groupby("study_id")["level"].apply(list).to_dict()
    assert per_study == {
        "s004": ["L1", "L2", "L4"], "s005": ["L2", "L3", "L4"], "s006": ["L1", "L3", "L4"],
        "s007": list(LEVELS), "s008": list(LEVELS), "s009": list(LEVELS), "s010": list(LEVELS),
    }
    labeled = cache.table.groupby("study_id")["labeled"].all().to_dict()
    assert labeled == {"s004": True, "s005": True, "s006": True, "s007": False, "s008": False, "s009": False, "s010": False}

    # Cached re-run: the same report, nothing recomputed.
    again = prepare_site(cfg, progress=False)
    assert again.prepared == 0 and again.cached == 7
    pd.testing.assert_frame_equal(quarantine(cfg), q)


def test_cli_prepares_and_reports_errors(make_site, tmp_path, capsys):
    site = make_site(n_labeled=1, n_unlabeled=0)
    cache = tmp_path / "cli_cache"
    rc = prepare_main(["--site", site.name, f"site.dir={site}", f"site.cache_dir={cache}", "radiomics.n_jobs=1", "--no-progress"])
    assert rc == 0 and len(SiteCache.open(cache)) == 4
    assert "prepared 1, skipped as cached 0, quarantined 0" in capsys.readouterr().out
    rc = prepare_main(["--site", "nowhere", f"site.dir={tmp_path / 'nowhere'}", f"site.cache_dir={cache}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "studies.csv: studies table not found" in err
    assert prepare_main(["crop.nonsense=1", "--no-progress"]) == 2
    assert prepare_main([f"site.dir={site}", f"site.cache_dir={cache}", "crop.size=abc", "--no-progress"]) == 1
    assert "crop.size must be a number" in capsys.readouterr().err


def shift_ids_down_8(a: np.ndarray) -> None:
    a[a > 0] -= 8


def test_site_yaml_label_preset(make_site, tmp_path):
    """A site's own site.yaml picks its label convention."""
    site = make_site(n_labeled=1, n_unlabeled=0)
    _relabel(site / "labels/s000.nii.gz", shift_ids_down_8)  # 31..28 -> 23..20
    (site / "site.yaml").write_text("label_map: {L1: 23, L2: 22, L3: 21, L4: 20}\n")
    cache = tmp_path / "c"
    assert prepare_main([f"site.dir={site}", f"site.cache_dir={cache}", "radiomics.n_jobs=1", "--no-progress"]) == 0
    assert len(SiteCache.open(cache)) == 4


def test_dicom_series_studies_and_bad_table_rows(make_site, prepare_cfg):
    """DICOM folders as CT: a complete series is prepared, one with a missing slice quarantined."""
    site = make_site(n_labeled=2, n_unlabeled=0)
    for sid, skip in (("s000", ()), ("s001", (20,))):
        write_dicom_series(sitk.ReadImage(str(site / f"ct/{sid}.nii.gz")), site / f"dicom/{sid}", skip=skip)
    studies = pd.read_csv(site / "studies.csv", dtype=str)
    studies["ct"] = ["dicom/s000", "dicom/s001"]
    extra = [{**studies.iloc[0].to_dict(), "ct_date": "01.03.2024", "study_id": "s002"},
             {**studies.iloc[0].to_dict()}]  # bad date; duplicate study_id
    pd.concat([studies, pd.DataFrame(extra)]).to_csv(site / "studies.csv", index=False)
    cfg = prepare_cfg(site)
    summary = prepare_site(cfg, progress=False)
    q = quarantine(cfg).set_index("case")
    assert q.loc["s001", "file"] == "dicom/s001" and "missing 1 slice" in q.loc["s001", "reason"]
    assert q.loc["s002", "reason"] == "ct_date not YYYY-MM-DD"
    assert list(q.loc["s000", "reason"]) == ["duplicate study_id"] * 2
    assert summary.quarantined == 4 and summary.prepared == 0
    # s000 is in the table twice, so neither row is trusted; fix the table and the DICOM study is prepared.
    studies.iloc[:1].to_csv(site / "studies.csv", index=False)
    assert prepare_site(cfg, progress=False).prepared == 1
    assert list(SiteCache.open(cfg.site.cache_dir).table["study_id"]) == ["s000"] * 4


def test_ct_date_in_the_future_is_quarantined(tmp_path):
    (tmp_path / "studies.csv").write_text("study_id,patient_id,ct_date,ct,labels\n"
                                          "s1,p1,2099-01-01,ct/s1.nii.gz,labels/s1.nii.gz\n"
                                          "s2,p2,2024-01-01,ct/s2.nii.gz,labels/s2.nii.gz\n")
    studies, problems = load_studies(tmp_path, "studies.csv")
    assert [s.study_id for s in studies] == ["s2"]
    assert [(p.case, p.file, p.reason) for p in problems] == [("s1", "studies.csv", "ct_date 2099-01-01 is in the future")]


def test_synthetic_sites_round_trip(tmp_path):
    """osteo-synth writes a site as a hospital would; preparation reads it back, consistent with the truth."""
    from osteo_model.config import compose, compose_site
    from osteofl.simulation.synth import generate

    base = [f"paths.root={tmp_path}", "site.name=site_b", "synth.sites=[site_b]", "synth.external_site=null",
            "synth.labeled_per_site=6", "synth.unlabeled_per_site=2", "synth.n_jobs=1", "radiomics.n_jobs=1"]
    generate(compose(base))
    cfg = compose_site(base)
    summary = prepare_site(cfg, progress=False)
    truth = pd.read_csv(tmp_path / "data/ground_truth/site_b.csv", dtype={"study_id": str})
    cache = SiteCache.open(cfg.site.cache_dir)
    assert summary.prepared == 8 and summary.quarantined == 0
    merged = cache.table.merge(truth, on=["study_id", "level"])
    # Exactly the vertebrae the generator cut with the scan edge are excluded.
    assert summary.excluded_levels == truth["truncated"].sum() and len(merged) == len(cache) == 32 - summary.excluded_levels
    labeled = merged[merged["labeled"]]
    assert labeled["paired"].all() and np.allclose(labeled["bmd"], labeled["dxa_bmd"], atol=1e-3)
    # Trabecular HU follows the true bone fraction of the phantom.
    assert np.corrcoef(merged["hu_mean"], merged["bvtv"])[0, 1] > 0.5
