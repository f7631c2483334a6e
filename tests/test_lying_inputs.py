"""Inputs that lie (issue 11 §6): each is quarantined with a one-line reason, never read as numbers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from omegaconf import OmegaConf

from conftest import LEVEL_Z0, SHAPE_ZYX
from osteo_model.cache import SiteCache
from osteo_model.cli.prepare import main as prepare_main
from osteo_model.constants import LEVELS
from osteo_model.crops import LevelExclusion, VertebraCrop, crop_levels
from osteo_model.ctio import read_geometry, read_image, read_study
from osteo_model.dxa import read_dxa
from osteo_model.errors import InputError
from osteo_model import prepare
from osteo_model.labels import level_boxes, resolve_label_map
from osteo_model.prepare import prepare_site

CROP = OmegaConf.create(
    {"fov_mm": 48.0, "size": 32, "trabecular_erosion_mm": 3.0, "min_body_volume_ml": 4.0, "edge_margin_vox": 1})
TOTAL = resolve_label_map("totalseg_total")


def quarantine(cfg) -> pd.DataFrame:
    return pd.read_csv(f"{cfg.site.cache_dir}/quarantine.csv", dtype=str, keep_default_na=False)


def prepare_with_reasons(cfg):
    """Prepare the site: its summary and each quarantined case's reason."""
    summary = prepare_site(cfg, progress=False)
    return summary, quarantine(cfg).set_index("case")["reason"].to_dict()


def image_like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    return img


def write(img: sitk.Image, path) -> object:
    sitk.WriteImage(img, str(path))
    return path


# --- Hounsfield units --------------------------------------------------------------------------------

def test_raw_values_with_outside_fov_padding_are_not_hounsfield(tmp_path, spine_phantom):
    """Stored values without the -1024 rescale, padded outside the FOV: the padding must not pass for air."""
    ct, labels = spine_phantom()
    raw = sitk.GetArrayFromImage(ct).astype(np.int16) + 1024
    padded = np.full((SHAPE_ZYX[0], SHAPE_ZYX[1] + 16, SHAPE_ZYX[2] + 16), -2000, np.int16)
    padded[:, 8:-8, 8:-8] = raw
    lab = np.zeros(padded.shape, np.uint8)
    lab[:, 8:-8, 8:-8] = sitk.GetArrayFromImage(labels)
    ct_path = write(sitk.GetImageFromArray(padded), tmp_path / "ct.nii.gz")
    lab_path = write(sitk.GetImageFromArray(lab), tmp_path / "lab.nii.gz")
    with pytest.raises(InputError, match="not in Hounsfield units: the tissue inside the body has median 10") as err:
        read_study(ct_path, lab_path)
    assert err.value.path == ct_path
    # The same scan in HU, with padding, passes.
    hu = np.where(padded == -2000, -3024, padded - 1024).astype(np.int16)
    write(sitk.GetImageFromArray(hu), ct_path)
    read_study(ct_path, lab_path)


# --- NaN voxels ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_nan_voxels_are_refused_not_read_as_zero(tmp_path, spine_phantom, suffix):
    ct, labels = spine_phantom()
    arr = sitk.GetArrayFromImage(ct).astype(np.float32)
    arr[LEVEL_Z0["L2"] + 3, 8:12, 12:16] = np.nan  # inside L2's body
    ct_path = write(image_like(arr, ct), tmp_path / f"ct{suffix}")
    lab_path = write(labels, tmp_path / f"lab{suffix}")
    with pytest.raises(InputError, match=r": 16 voxel\(s\) are NaN or infinite \(not a number\)") as err:
        read_study(ct_path, lab_path)
    assert err.value.path == ct_path
    write(image_like(np.nan_to_num(arr, nan=40.0), ct), ct_path)
    read_study(ct_path, lab_path)  # the same float image without NaN passes


# --- 4-D and 2-D images -------------------------------------------------------------------------------

@pytest.mark.parametrize("volumes, reason", [(2, r"4-D image \(10x9x8x2\); expected one 3-D volume"),
                                             (0, r"2-D image \(10x9\); expected one 3-D volume")])
def test_4d_and_2d_images_are_refused_in_one_line(tmp_path, volumes, reason):
    path = tmp_path / "ct.nii.gz"
    volume = sitk.GetImageFromArray(np.zeros((8, 9, 10), np.int16))
    sitk.WriteImage(sitk.JoinSeries([volume] * volumes) if volumes else volume[:, :, 0], str(path))
    for read in (read_geometry, read_image):
        with pytest.raises(InputError, match=reason) as err:
            read(path)
        assert err.value.path == path


# --- Level anatomy ------------------------------------------------------------------------------------

def crops_of(ct, label_arr, label_map=TOTAL, crop_cfg=CROP):
    return {r.level: r for r in crop_levels(ct, label_arr, label_map, crop_cfg)}


def test_stray_voxel_at_scan_edge_does_not_truncate_a_complete_level(spine_phantom):
    ct, labels = spine_phantom()
    arr = sitk.GetArrayFromImage(labels)
    arr[-1, 3, 5] = TOTAL["L1"]  # one speck of "L1" in the last slice
    results = crops_of(ct, arr)
    assert all(isinstance(results[lv], VertebraCrop) for lv in LEVELS), results
    whole = crops_of(ct, sitk.GetArrayFromImage(labels))
    assert results["L1"].body_volume_ml == whole["L1"].body_volume_ml and results["L1"].hu_mean == whole["L1"].hu_mean


def test_organs_under_a_wrong_label_preset_are_not_vertebrae(spine_phantom):
    """TotalSegmentator masks read with the `plain` preset: ids 1-4 are spleen, kidneys, gallbladder."""
    ct, labels = spine_phantom()
    arr = sitk.GetArrayFromImage(labels)
    for organ, z in enumerate((44, 30, 16, 2), start=1):  # soft-tissue blobs beside the spine, 6.9 ml each
        arr[z : z + 12, 4:16, 27:33] = organ
    results = crops_of(ct, arr, resolve_label_map("plain"))
    for level in LEVELS:
        assert isinstance(results[level], LevelExclusion)
        assert results[level].reason.startswith("implausible anatomy: not bone (90th percentile 40 HU")
        assert results[level].reason.endswith("wrong label map or preset?")
    assert all(isinstance(r, VertebraCrop) for r in crops_of(ct, arr).values())  # the right preset


def test_levels_out_of_cranio_caudal_order_are_excluded(spine_phantom):
    ct, labels = spine_phantom()
    reversed_map = {"L1": 28, "L2": 29, "L3": 30, "L4": 31}  # TotalSegmentator's ids read backwards
    results = crops_of(ct, sitk.GetArrayFromImage(labels), reversed_map)
    assert {r.reason for r in results.values()} == {
        "implausible anatomy: L2 lies above L1 (L1 to L4 run head to feet); wrong label map or preset?"}
    # Physical z, not voxel order: the same scan stored feet-first (z flipped in the header) is fine.
    flipped_ct, flipped_labels = (sitk.Flip(img, [False, False, True]) for img in (ct, labels))
    assert all(isinstance(r, VertebraCrop) for r in crops_of(flipped_ct, sitk.GetArrayFromImage(flipped_labels)).values())


def test_level_too_large_for_a_vertebra_and_one_off_the_spine(spine_phantom):
    ct, labels = spine_phantom()
    big_ct, big_labels = (sitk.Image(img) for img in (ct, labels))
    for img in (big_ct, big_labels):
        img.SetSpacing((4.0, 4.0, 4.0))  # every level 8x its volume: ~180 ml
    results = crops_of(big_ct, sitk.GetArrayFromImage(big_labels))
    assert all(r.reason.startswith("implausible anatomy: 1") and "larger than a lumbar vertebra" in r.reason
               for r in results.values()), results
    # L3's label moved 26 voxels (52 mm) sideways, bone and all.
    arr, ct_arr = sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(ct)
    wide = np.zeros((SHAPE_ZYX[0], SHAPE_ZYX[1], SHAPE_ZYX[2] + 30), np.uint8)
    wide_ct = np.full(wide.shape, -1000, np.int16)
    wide[..., :SHAPE_ZYX[2]], wide_ct[..., :SHAPE_ZYX[2]] = arr, ct_arr
    z = slice(LEVEL_Z0["L3"], LEVEL_Z0["L3"] + 10)
    wide[z, :, 26:62], wide_ct[z, :, 26:62] = wide[z, :, :36].copy(), wide_ct[z, :, :36].copy()
    wide[z, :, :26] = 0
    ref = sitk.GetImageFromArray(wide_ct)
    ref.SetSpacing(ct.GetSpacing())
    results = crops_of(ref, wide)
    assert results["L3"].reason.startswith("implausible anatomy: 52 mm off the axis of the other vertebrae")
    assert all(isinstance(results[lv], VertebraCrop) for lv in ("L1", "L2", "L4"))


# --- Site tables as spreadsheets export them -----------------------------------------------------------

def test_european_excel_dxa_export(tmp_path):
    """';' with decimal commas, a BOM, loose header case and spaces, vendor names, Excel's blank rows."""
    path = tmp_path / "dxa.csv"
    path.write_bytes(
        "\ufeffPatient_ID ; DXA_Date;Manufacturer;Model;BMD_L1;BMD_L2;BMD_L3;BMD_L4;Sex;Age\r\n"
        "p1;2024-01-10;GE Healthcare Lunar;Prodigy;0,812;0,9;;1,05;W;61\r\n"
        ";;;;;;;;;\r\n"
        "p2;2024-02-01;Hologic, Inc.;Horizon A;1,1;1,0;0,95;1,2;M;70\r\n"
        ";;;;;;;;;\r\n".encode("utf-8"))
    table, problems = read_dxa(path)
    assert problems == []
    assert list(table["patient_id"]) == ["p1", "p2"] and list(table["line"]) == [2, 4]
    assert list(table["manufacturer"]) == ["ge_lunar", "hologic"] and list(table["sex"]) == ["female", "male"]
    assert table.iloc[0]["bmd_l1"] == 0.812 and np.isnan(table.iloc[0]["bmd_l3"]) and table.iloc[1]["bmd_l4"] == 1.2
    assert list(table["age"]) == [61.0, 70.0]


def test_trailing_comma_does_not_shift_columns(tmp_path):
    path = tmp_path / "dxa.csv"
    path.write_text("patient_id,dxa_date,manufacturer,model,bmd_l1,bmd_l2,bmd_l3,bmd_l4\n"
                    "p1,2024-01-10,Hologic,Horizon,0.8,0.9,1.0,1.1,\n"
                    "p2,2024-01-10,Lunar,Prodigy,0.7,0.8,0.9,1.0,,\n"
                    "p3,2024-01-10,Hologic,Horizon,0,8,0.9,1.0,1.1\n")  # a decimal comma in a comma file
    table, problems = read_dxa(path)
    assert list(table["patient_id"]) == ["p1", "p2"] and list(table["bmd_l1"]) == [0.8, 0.7]
    assert list(table["bmd_l4"]) == [1.1, 1.0] and list(table["manufacturer"]) == ["hologic", "ge_lunar"]
    assert [(p.case, p.reason) for p in problems] == [
        ("dxa.csv line 4", "9 values for 8 columns (a stray ',' would shift every value after it)")]


def test_site_with_spreadsheet_tables_and_no_dxa_table(make_site, prepare_cfg):
    """studies.csv with ';', capitals, blank rows and trailing ';'; a row with a stray value names no id."""
    site = make_site(n_labeled=2, n_unlabeled=0)
    rows = ["Study_ID;Patient_ID;CT_Date;CT;Labels;Scanner;"]
    rows += [f"s00{i};p00{i};2024-03-01;ct/s00{i}.nii.gz;labels/s00{i}.nii.gz;Phantom CT;" for i in range(2)]
    rows += [";;;;;;", "s002;p002;2024-03-01;ct/s000.nii.gz;labels/s000.nii.gz;Phantom;CT", ";;;;;;"]
    (site / "studies.csv").write_text("\n".join(rows) + "\n")
    (site / "dxa.csv").unlink()
    cfg = prepare_cfg(site)
    summary = prepare_site(cfg, progress=False)
    assert (summary.prepared, summary.quarantined, summary.unlabeled_studies) == (2, 1, 2)
    assert summary.line().endswith("; no dxa.csv: every study unlabeled")
    q = quarantine(cfg)
    assert [tuple(r) for r in q[["case", "file", "action"]].itertuples(index=False)] == [
        ("studies.csv line 5", "studies.csv", "quarantined"), ("dxa.csv", "dxa.csv", "unlabeled")]
    assert not q["case"].str.startswith("p").any()  # never a patient id where a study id belongs
    assert list(SiteCache.open(cfg.site.cache_dir).table["study_id"].unique()) == ["s000", "s001"]


def test_dxa_ids_changed_by_a_spreadsheet_leave_the_site_unlabeled_loudly(make_site, prepare_cfg, capsys):
    """Excel turned 'p000' into 'P000' and 'p001' into 'P1': no study pairs; each row is named in quarantine.csv
    (which stays at the site), the summary line says so without printing a patient id."""
    site = make_site(n_labeled=2, n_unlabeled=0)
    dxa = pd.read_csv(site / "dxa.csv", dtype=str, keep_default_na=False)
    dxa["patient_id"] = ["P000", "P1"]
    dxa.to_csv(site / "dxa.csv", index=False)
    cfg = prepare_cfg(site)
    summary = prepare_site(cfg, progress=False)
    assert (summary.prepared, summary.unlabeled_studies, summary.dxa_rows_quarantined) == (2, 2, 0)
    assert summary.line().endswith("; no study paired with a dxa.csv row: every study unlabeled")
    out = capsys.readouterr().out
    assert "no study paired with a dxa.csv row" in out and "P000" not in out and "p000" not in out
    q = quarantine(cfg)
    assert [tuple(r) for r in q[["case", "file", "action"]].itertuples(index=False)] == [
        ("dxa.csv line 2", "dxa.csv", "unpaired"), ("dxa.csv line 3", "dxa.csv", "unpaired")]
    assert "patient_id 'P1' matches no usable study in studies.csv (a study has 'p001'" in q["reason"][1]


# --- Whole sites ---------------------------------------------------------------------------------------

def test_lying_studies_are_quarantined_the_good_one_prepared(make_site, prepare_cfg):
    site = make_site(n_labeled=5, n_unlabeled=0)
    ct, labels = (sitk.ReadImage(str(site / f"{kind}/s000.nii.gz")) for kind in ("ct", "labels"))
    write(sitk.JoinSeries([ct, ct]), site / "ct/s000.nii.gz")                 # 4-D
    write(labels[:, :, 30], site / "labels/s001.nii.gz")                     # 2-D
    arr = sitk.GetArrayFromImage(ct).astype(np.float32)
    arr[40, 10, 10] = np.nan
    write(image_like(arr, ct), site / "ct/s002.nii.gz")                      # NaN
    raw = np.pad(sitk.GetArrayFromImage(ct) + 1024, ((0, 0), (4, 4), (4, 4)), constant_values=-2000)
    lab = np.pad(sitk.GetArrayFromImage(labels), ((0, 0), (4, 4), (4, 4)))
    for kind, volume in (("ct", raw.astype(np.int16)), ("labels", lab)):
        write(sitk.GetImageFromArray(volume), site / f"{kind}/s003.nii.gz")  # raw stored values, padded
    cfg = prepare_cfg(site)
    summary, reasons = prepare_with_reasons(cfg)
    assert (summary.prepared, summary.quarantined) == (1, 4)
    assert reasons["s000"] == "4-D image (36x32x60x2); expected one 3-D volume"
    assert reasons["s001"] == "2-D image (36x32); expected one 3-D volume"
    assert reasons["s002"].startswith("1 voxel(s) are NaN or infinite")
    assert reasons["s003"].startswith("CT not in Hounsfield units: the tissue inside the body has median 10")
    assert list(SiteCache.open(cfg.site.cache_dir).table["study_id"].unique()) == ["s004"]


def test_odd_studies_are_quarantined_one_by_one(make_site, prepare_cfg, monkeypatch):
    """A CT given as its label map, an empty labels cell, an error no check foresaw (here MemoryError) and a
    stray 2**31-1 'ignore' voxel: the first three are quarantined with a reason, the others prepared."""
    site = make_site(n_labeled=5, n_unlabeled=0)
    (site / "labels/s000.nii.gz").write_bytes((site / "ct/s000.nii.gz").read_bytes())
    table = pd.read_csv(site / "studies.csv", dtype=str)
    table.loc[1, "labels"] = ""
    table.to_csv(site / "studies.csv", index=False)
    labels = sitk.ReadImage(str(site / "labels/s003.nii.gz"))
    arr = sitk.GetArrayFromImage(labels).astype(np.int32)
    arr[0, 0, 0] = 2**31 - 1
    write(image_like(arr, labels), site / "labels/s003.nii.gz")
    real_read = prepare.ctio.read_study

    def read_study(ct_path, labels_path):
        if ct_path.name.startswith("s002"):
            raise MemoryError("Unable to allocate 8.00 GiB")
        return real_read(ct_path, labels_path)

    monkeypatch.setattr(prepare.ctio, "read_study", read_study)
    cfg = prepare_cfg(site)
    summary, reasons = prepare_with_reasons(cfg)
    assert (summary.prepared, summary.quarantined) == (2, 3)
    assert reasons["s000"].startswith("label map holds negative values (min -1000)")
    assert reasons["s001"] == "empty labels column"
    assert reasons["s002"] == "preparation failed (MemoryError: Unable to allocate 8.00 GiB)"
    table = SiteCache.open(cfg.site.cache_dir).table
    assert list(table["study_id"].unique()) == ["s003", "s004"]
    assert (table["study_id"] == "s003").sum() == len(LEVELS)


def test_one_scan_listed_twice_is_found_by_content(make_site, prepare_cfg):
    """A CT copied under another name: under another patient both go (whose DXA labels it, and on which side
    of the patient split it falls, are in doubt); under the same patient the first is kept."""
    site = make_site(n_labeled=4, n_unlabeled=0)
    for kind in ("ct", "labels"):
        (site / f"{kind}/s003.nii.gz").write_bytes((site / f"{kind}/s000.nii.gz").read_bytes())
        (site / f"{kind}/copy.nii.gz").write_bytes((site / f"{kind}/s001.nii.gz").read_bytes())
    table = pd.read_csv(site / "studies.csv", dtype=str)
    table.loc[len(table)] = ["s004", "p001", "2024-03-02", "ct/copy.nii.gz", "labels/copy.nii.gz", "Phantom CT"]
    table.to_csv(site / "studies.csv", index=False)
    cfg = prepare_cfg(site)
    summary, reasons = prepare_with_reasons(cfg)
    assert (summary.prepared, summary.quarantined) == (2, 3)
    assert reasons["s000"] == "same CT file content as study s003 of another patient_id: one scan under two patients?"
    assert reasons["s003"] == "same CT file content as study s000 of another patient_id: one scan under two patients?"
    assert reasons["s004"] == "same CT file content as study s001 of the same patient: duplicate"
    assert list(SiteCache.open(cfg.site.cache_dir).table["study_id"].unique()) == ["s001", "s002"]


def test_level_boxes_memory_does_not_grow_with_the_largest_label_value():
    """A table indexed by label value would take 8 GiB for one 2**31-1 voxel (lazily, until memory is tight)."""
    arr = np.zeros((40, 40, 40), np.int32)
    arr[10:20, 10:20, 10:20] = TOTAL["L1"]
    arr[0, 0, 0] = 2**31 - 1
    tracemalloc.start()
    boxes = level_boxes(arr, TOTAL)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert boxes["L1"] == (slice(10, 20),) * 3 and boxes["L2"] is None
    assert peak < 10 * arr.nbytes


def test_unwritable_cache_folder_is_one_clear_error(make_site, tmp_path, capsys):
    site = make_site(n_labeled=1, n_unlabeled=0)
    blocked = site / "studies.csv" / "cache"  # a "folder" inside a file: no user, root included, can write there
    rc = prepare_main([f"site.dir={site}", f"site.cache_dir={blocked}", "radiomics.n_jobs=1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {blocked}/entries: cache folder is not writable (Not a directory)")
    assert sorted(p.name for p in site.iterdir()) == ["ct", "dxa.csv", "labels", "studies.csv"]
    if os.geteuid() != 0:  # permissions do not stop root
        readonly = tmp_path / "ro"
        readonly.mkdir(mode=0o500)
        rc = prepare_main([f"site.dir={site}", f"site.cache_dir={readonly / 'cache'}", "--no-progress"])
        assert rc == 1 and "cache folder is not writable (Permission denied)" in capsys.readouterr().err
        assert list(readonly.iterdir()) == []


# --- osteo-prepare's process pool ----------------------------------------------------------------------

def _children(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_prepare_leaves_no_worker_and_resumes_from_cache(make_site, tmp_path, capsys, sig):
    site = make_site(n_labeled=16, n_unlabeled=0)
    cache = tmp_path / "cache"
    args = [f"site.dir={site}", f"site.cache_dir={cache}", "radiomics.n_jobs=2", "--no-progress"]
    main = subprocess.Popen([sys.executable, "-m", "osteo_model.cli.prepare", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while not list((cache / "entries").glob("*.npz")) and time.monotonic() < deadline and main.poll() is None:
            time.sleep(0.02)
        workers = _children(main.pid)
        assert main.poll() is None and workers, "osteo-prepare ended before it could be killed mid-run"
        main.send_signal(sig)
        main.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if _running(pid)], "pool workers outlived osteo-prepare"
    finally:
        for pid in [main.pid, *workers]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    stale = cache / "entries" / f".0123.npz.tmp-{main.pid}"  # as a worker killed mid-write leaves it
    stale.write_bytes(b"half an entry")
    assert prepare_main(args) == 0
    assert not list((cache / "entries").glob(".*.tmp-*"))
    out = capsys.readouterr().out
    done = int(out.split("prepared ")[1].split(",")[0])
    cached = int(out.split("skipped as cached ")[1].split(",")[0])
    assert done >= 1 and cached >= 1 and done + cached == 16 and "quarantined 0 studies" in out
    assert len(SiteCache.open(cache)) == 64


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_resume_removes_a_zombie_writers_entry_and_keeps_a_live_ones(make_site, tmp_path):
    """Where PID 1 does not reap (containers), a killed run's pool worker stays a zombie: its half-written
    entry is garbage all the same. A live writer's (another run still working) is left alone."""
    site = make_site(n_labeled=2, n_unlabeled=0)
    entries = tmp_path / "cache" / "entries"
    entries.mkdir(parents=True)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 30
        while _running(zombie.pid) and time.monotonic() < deadline:  # exited, not yet waited for
            time.sleep(0.02)
        assert Path(f"/proc/{zombie.pid}").exists(), "the child was reaped before the check"
        dead_tmp = entries / f".0001.npz.tmp-{zombie.pid}"
        live_tmp = entries / f".0002.npz.tmp-{live.pid}"
        for tmp in (dead_tmp, live_tmp):
            tmp.write_bytes(b"half an entry")
        assert prepare_main([f"site.dir={site}", f"site.cache_dir={tmp_path / 'cache'}", "--no-progress"]) == 0
        assert not dead_tmp.exists() and live_tmp.exists()
    finally:
        live.kill()
        live.wait()
        zombie.wait()
