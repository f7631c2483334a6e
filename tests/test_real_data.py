"""The pipeline on real CT from ../shared/data/real (TotalSegmentator's public test cases)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from osteo_model.cache import SiteCache
from osteo_model.constants import LEVELS
from osteo_model.ctio import read_image, read_study
from osteo_model.prepare import prepare_site

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
EXAMPLE, DICOM = REAL / "totalseg_example", REAL / "totalseg_dicom"
pytestmark = pytest.mark.skipif(not (EXAMPLE / "ct.nii.gz").is_file(), reason="../shared/data/real not present")


@pytest.fixture
def real_site(tmp_path: Path) -> Path:
    """The example CT as a one-study site in the README format (files referenced where they lie)."""
    site = tmp_path / "real"
    site.mkdir()
    pd.DataFrame([{"study_id": "example", "patient_id": "x", "ct_date": "2020-01-01", "ct": str(EXAMPLE / "ct.nii.gz"),
                   "labels": str(EXAMPLE / "seg_total.nii.gz")}]).to_csv(site / "studies.csv", index=False)
    return site


def test_example_yields_four_plausible_crops(real_site, prepare_cfg):
    cfg = prepare_cfg(real_site, "site.label_preset=totalseg_total")
    summary = prepare_site(cfg, progress=False)
    assert (summary.prepared, summary.quarantined, summary.excluded_levels) == (1, 0, 0)
    cache = SiteCache.open(cfg.site.cache_dir)
    t = cache.table
    assert list(t["level"]) == list(LEVELS) and not t["labeled"].any()
    assert cache.crops.shape == (4, 32, 32, 32) and np.isfinite(cache.features).all()
    report = json.loads((EXAMPLE / "spine_report.json").read_text())["results"]
    for row in t.itertuples():
        # TotalSegmentator's own eroded-body medians are 110-124 HU; bodies on seg_vertebral_bodies 125-148.
        assert abs(row.hu_median - report[f"vertebrae_{row.level}_intensity_median"]) < 20, row
        assert 80 < row.hu_mean < 180
        # Our body is the whole vertebra anterior of the canal: a little larger than the report's body.
        assert 0.9 < row.body_volume_ml / report[f"vertebrae_{row.level}_volume_ml"] < 1.4, row
    # Crops hold bone: the trabecular core is denser than soft tissue, the crop has air/fat around.
    core = np.asarray(cache.crops)[np.asarray(cache.masks) == 2]
    assert 60 < np.median(core) < 200
    # Radiomics: a texture feature that varies between vertebrae.
    assert np.ptp(np.asarray(cache.features), axis=0).max() > 0


def test_dicom_series_reads_with_geometry():
    img = read_image(DICOM / "ct")
    assert img.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(img.GetSpacing(), (0.9765625, 0.9765625, 2.0), atol=1e-5)
    np.testing.assert_allclose(img.GetOrigin(), (-249.51171875, -437.51171875, -804.5), atol=1e-3)
    arr = sitk.GetArrayViewFromImage(img)
    assert arr.min() == -1024 and 1000 < arr.max() < 3000  # rescaled to HU
    # Its TotalSegmentator mask is stored y-flipped on the same grid: it is reoriented, not refused.
    ct, labels = read_study(DICOM / "ct", DICOM / "seg_total.nii.gz")
    assert labels.shape == (20, 512, 512)
    t12 = sitk.GetArrayViewFromImage(ct)[labels == 32]
    assert 150 < np.median(t12) < 300  # bone, so the mask landed on the vertebra


def test_a_label_map_mirrored_left_right_is_excluded_level_by_level(tmp_path):
    """The input audit's real_apflip: seg_total with its voxels mirrored left-right and the header untouched (a
    radiological/neurological mix-up) put each mask 15-18 mm beside its vertebra (Dice 0.37-0.50), still over some
    bone and on the spine's axis; all four levels were cropped, L1 at 66 HU instead of 106. Each is now excluded
    for holding too little of the dense bone around it; the map as it is keeps all four."""
    from omegaconf import OmegaConf

    from osteo_model.crops import LevelExclusion, VertebraCrop, crop_levels
    from osteo_model.labels import resolve_label_map

    crop = OmegaConf.create({"fov_mm": 48.0, "size": 32, "trabecular_erosion_mm": 3.0, "min_body_volume_ml": 4.0,
                             "edge_margin_vox": 1})
    ct, labels = read_image(EXAMPLE / "ct.nii.gz"), sitk.GetArrayFromImage(read_image(EXAMPLE / "seg_total.nii.gz"))
    levels = resolve_label_map("totalseg_total")
    assert all(isinstance(r, VertebraCrop) for r in crop_levels(ct, labels, levels, crop))
    mirrored = crop_levels(ct, np.ascontiguousarray(labels[:, :, ::-1]), levels, crop)
    assert all(isinstance(r, LevelExclusion) and "of the dense bone around it" in r.reason for r in mirrored), mirrored


def test_a_boundary_put_too_high_excludes_the_level_that_took_the_arch():
    """L1's lower slices relabelled L2 (the input audit's l1_half_is_l2 on the real CT). On this CT those slices
    are L1's inferior articular and spinous processes, which reach down beside L2 and join it in one piece:
    L2's 'body' became its whole label (77 ml against 43, mean HU 127 -> 157) and was cropped and labelled as it
    was; L1 kept its body and lost its arch. Both labels are now 100 % 'body' against the other levels' 71 %, and
    both are excluded; L3 and L4 are kept."""
    from omegaconf import OmegaConf

    from osteo_model.crops import LevelExclusion, VertebraCrop, crop_levels
    from osteo_model.labels import resolve_label_map

    crop = OmegaConf.create({"fov_mm": 48.0, "size": 32, "trabecular_erosion_mm": 3.0, "min_body_volume_ml": 4.0,
                             "edge_margin_vox": 1})
    ct, labels = read_image(EXAMPLE / "ct.nii.gz"), sitk.GetArrayFromImage(read_image(EXAMPLE / "seg_total.nii.gz"))
    levels = resolve_label_map("totalseg_total")
    rows = np.flatnonzero((labels == levels["L1"]).any(axis=(1, 2)))
    for z in rows[: len(rows) // 2]:
        labels[z][labels[z] == levels["L1"]] = levels["L2"]
    results = {r.level: r for r in crop_levels(ct, labels, levels, crop)}
    for level in ("L1", "L2"):
        assert isinstance(results[level], LevelExclusion), results[level]
        assert results[level].reason.startswith("implausible anatomy: the part taken as the vertebral body is 100% of "
                                                "the vertebra, the other levels' 71%")
    assert all(isinstance(results[lv], VertebraCrop) for lv in ("L3", "L4"))
