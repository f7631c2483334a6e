"""Vertebral body crops on the blocky phantom: body found, statistics, exclusions, label maps."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from omegaconf import OmegaConf

from conftest import BODY_VOLUME_ML, LEVEL_Z0
from osteo_model.constants import LEVELS, MIN_BONE_COVERAGE
from osteo_model.crops import BODY, CORE, LevelExclusion, VertebraCrop, bone_coverage, crop_levels
from osteo_model.errors import ConfigError
from osteo_model.labels import level_boxes, resolve_label_map

CROP = OmegaConf.create(
    {"fov_mm": 48.0, "size": 32, "trabecular_erosion_mm": 3.0, "min_body_volume_ml": 4.0, "edge_margin_vox": 1})
TOTAL = resolve_label_map("totalseg_total")


def run(ct, labels, crop_cfg=CROP, label_map=TOTAL):
    return {r.level: r for r in crop_levels(ct, sitk.GetArrayFromImage(labels), label_map, crop_cfg)}


def test_four_body_crops_with_trabecular_statistics(spine_phantom):
    ct, labels = spine_phantom(trabecular_hu=150.0)
    results = run(ct, labels)
    assert list(results) == list(LEVELS)
    for level, r in results.items():
        assert isinstance(r, VertebraCrop), r
        # The posterior arch carries the same label: only the body box counts.
        assert r.body_volume_ml == pytest.approx(BODY_VOLUME_ML)
        # Core = body eroded by 3 mm (one 2-mm voxel): the 500-HU shell is gone, the noisy interior stays.
        assert abs(r.hu_mean - 150.0) < 8 and abs(r.hu_median - 150.0) < 10 and 30 < r.hu_std < 50
        assert r.crop.shape == r.mask.shape == (32, 32, 32)
        assert r.crop.dtype == np.int16 and r.mask.dtype == np.uint8
        assert set(np.unique(r.mask)) == {0, BODY, CORE}
        # Centred on the body: the mask's centroid is the crop centre (index 15.5).
        np.testing.assert_allclose(np.argwhere(r.mask > 0).mean(axis=0), 15.5, atol=0.8)
        # Body voxels at 1.5 mm: 32 x 24 x 20 mm box -> about the same volume.
        assert (r.mask > 0).sum() * 1.5**3 / 1000 == pytest.approx(BODY_VOLUME_ML, rel=0.15)
        # Resampled: the core edge picks up some of the 500-HU shell by interpolation.
        assert r.crop[r.mask == CORE].mean() == pytest.approx(150.0, abs=25)


def test_crop_size_and_fov_are_config(spine_phantom):
    ct, labels = spine_phantom()
    r = run(ct, labels, OmegaConf.merge(CROP, {"fov_mm": 64.0, "size": 16}))["L2"]
    assert r.crop.shape == (16, 16, 16)
    assert (r.mask > 0).sum() * 4.0**3 / 1000 == pytest.approx(BODY_VOLUME_ML, rel=0.35)


def test_missing_level_is_excluded_others_kept(spine_phantom):
    ct, labels = spine_phantom(levels=("L1", "L2", "L4"))
    results = run(ct, labels)
    assert isinstance(results["L3"], LevelExclusion) and "missing" in results["L3"].reason
    assert all(isinstance(results[lv], VertebraCrop) for lv in ("L1", "L2", "L4"))


def test_vertebra_cut_by_scan_edge_is_truncated(spine_phantom):
    ct, labels = spine_phantom()
    top = LEVEL_Z0["L1"] + 5  # the scan ends half way through L1
    results = run(ct[:, :, :top], labels[:, :, :top])
    assert isinstance(results["L1"], LevelExclusion) and "truncated" in results["L1"].reason
    assert all(isinstance(results[lv], VertebraCrop) for lv in ("L2", "L3", "L4"))


def test_tiny_vertebra_is_excluded(spine_phantom):
    ct, labels = spine_phantom()
    arr = sitk.GetArrayFromImage(labels)
    arr[arr == TOTAL["L3"]] = 0
    z = LEVEL_Z0["L3"]
    arr[z + 4 : z + 6, 10:12, 16:18] = TOTAL["L3"]  # 8 voxels = 0.064 ml
    tiny = sitk.GetImageFromArray(arr)
    tiny.CopyInformation(labels)
    results = run(ct, tiny)
    assert isinstance(results["L3"], LevelExclusion) and "tiny" in results["L3"].reason
    assert isinstance(results["L2"], VertebraCrop)


def test_body_only_masks_are_kept_whole(spine_phantom):
    """Masks of bodies alone (no canal gap, e.g. TotalSegmentator vertebrae_body) are not cut."""
    ct, labels = spine_phantom()
    arr = sitk.GetArrayFromImage(labels)
    arr[:, 18:, :] = 0  # drop the posterior arch
    body_only = sitk.GetImageFromArray(arr)
    body_only.CopyInformation(labels)
    assert run(ct, body_only)["L1"].body_volume_ml == pytest.approx(BODY_VOLUME_ML)


def test_label_presets_and_custom_map(spine_phantom):
    assert resolve_label_map("verse") == {"L1": 20, "L2": 21, "L3": 22, "L4": 23}
    assert resolve_label_map("totalseg_total", {"L1": 5, "L2": 6}) == {"L1": 5, "L2": 6}
    with pytest.raises(ConfigError, match="unknown site.label_preset"):
        resolve_label_map("nnunet")
    with pytest.raises(ConfigError, match="unknown levels"):
        resolve_label_map(None, {"L5": 3})
    plain = resolve_label_map("plain")
    ct, labels = spine_phantom(label_map=plain)
    assert all(isinstance(r, VertebraCrop) for r in run(ct, labels, label_map=plain).values())
    boxes = level_boxes(sitk.GetArrayFromImage(labels), plain)
    assert boxes["L1"][0] == slice(LEVEL_Z0["L1"], LEVEL_Z0["L1"] + 10)
    assert level_boxes(np.zeros((3, 3, 3), np.int32), plain)["L2"] is None


def _relabel(labels: sitk.Image, edit) -> sitk.Image:
    """A copy of ``labels`` whose array ``edit`` changed in place."""
    arr = sitk.GetArrayFromImage(labels)
    edit(arr)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(labels)
    return img


def test_label_cut_in_two_is_excluded_but_a_speck_is_not(spine_phantom):
    """L1 cut by one empty slice: which half gets measured would be chance, so the level is excluded. A stray
    speck of the same id (as TotalSegmentator leaves) is ignored."""
    ct, labels = spine_phantom()
    z = LEVEL_Z0["L1"] + 5

    def cut(arr):
        arr[z][arr[z] == TOTAL["L1"]] = 0

    def speck(arr):
        arr[LEVEL_Z0["L1"] + 4, 2:4, 2:4] = TOTAL["L1"]  # 4 voxels, well away from L1

    results = run(ct, _relabel(labels, cut))
    assert isinstance(results["L1"], LevelExclusion)
    assert results["L1"].reason.startswith("label in 2 pieces: the second largest is 80% of the largest")
    assert all(isinstance(results[lv], VertebraCrop) for lv in ("L2", "L3", "L4"))
    kept = run(ct, _relabel(labels, speck))["L1"]
    assert isinstance(kept, VertebraCrop) and kept.body_volume_ml == pytest.approx(BODY_VOLUME_ML)
    # A vertebra cut by the scan edge may fall apart too: the edge is the reason given.
    top = z + 3
    edge = run(ct[:, :, :top], _relabel(labels, cut)[:, :, :top])["L1"]
    assert isinstance(edge, LevelExclusion) and edge.reason == "truncated by the scan edge"


def test_half_a_vertebra_labelled_as_its_neighbour_excludes_both(spine_phantom):
    """The L1/L2 boundary put mid-body: L1's lower half carries L2's id. L2 falls in two pieces, and what
    is left of L1 is one piece of the right bone, but half the size of the other levels: measured, its crop and
    HU would be labelled with the whole L1's DXA BMD. A wedge-fractured L1 (a third of its height lost) is kept."""
    ct, labels = spine_phantom()
    z = LEVEL_Z0["L1"]

    def lower_half_as_l2(arr):
        half = arr[z:z + 5]
        half[half == TOTAL["L1"]] = TOTAL["L2"]

    def wedge(arr):
        top = arr[z:z + 3]
        top[top == TOTAL["L1"]] = 0

    results = run(ct, _relabel(labels, lower_half_as_l2))
    assert results["L2"].reason.startswith("label in 2 pieces")
    assert isinstance(results["L1"], LevelExclusion)
    assert results["L1"].reason.startswith("implausible anatomy: ") and "50% of the other levels' median" in results["L1"].reason
    assert all(isinstance(results[lv], VertebraCrop) for lv in ("L3", "L4"))
    assert all(isinstance(r, VertebraCrop) for r in run(ct, _relabel(labels, wedge)).values())


def test_front_and_back_swapped_keeps_too_little_body_and_is_excluded(spine_phantom):
    """A header that lost its orientation puts the posterior arch in front: the canal cut then keeps the
    lamina (23 % of the vertebra, still 5 ml, above the tiny limit) as the 'body'; it is excluded."""
    swapped = []
    for img in spine_phantom():
        img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))  # y reversed: anterior <-> posterior
        swapped.append(img)
    for level, r in run(*swapped).items():
        assert isinstance(r, LevelExclusion), level
        assert "implausible anatomy: the part taken as the vertebral body (5.1 ml) is 23% of the vertebra" in r.reason


def test_bone_coverage_is_the_share_of_the_dense_bone_around_a_mask_that_it_holds():
    """A mask on its bone holds all of it; the same mask moved sideways by most of its width holds little, since
    the bone it left lies within the margin around it (the mirrored label map of tests/test_real_data.py). The
    slices above and below the level's are not counted: they are other vertebrae."""
    ct = np.full((12, 30, 40), 40.0)
    ct[:, 10:20, 15:25] = 600.0  # a column of dense bone, 10 voxels (20 mm) wide
    on = np.zeros(ct.shape, bool)
    on[3:9, 10:20, 15:25] = True
    box = (slice(3, 9), slice(10, 20), slice(15, 25))
    spacing = np.array([2.0, 2.0, 2.0])
    assert bone_coverage(ct, box, on[box], spacing, axial=0, dense_hu=600) == 1.0
    def moved(voxels: int) -> float:  # the mask moved sideways; bone within 3 voxels (6 mm) of its box counts
        return bone_coverage(ct, (box[0], box[1], slice(15 + voxels, 25 + voxels)), on[box], spacing, axial=0, dense_hu=600)

    assert moved(7) == pytest.approx(3 / 6) and moved(7) >= MIN_BONE_COVERAGE  # half of what it sees: kept
    assert moved(9) == pytest.approx(1 / 4) and moved(9) < MIN_BONE_COVERAGE  # 18 mm, as the mirrored real L1
    up = np.zeros((12, 30, 40), np.float32)
    up[:3] = 600.0  # the vertebra above, outside the level's slices: not its bone
    assert bone_coverage(up + ct, box, on[box], spacing, axial=0, dense_hu=600) == 1.0


def test_a_vertebra_whose_brightest_bone_is_under_250_hu_is_not_taken_for_a_mask_off_its_bone(spine_phantom):
    """A fixed 'dense' of 250 HU found no dense bone around a synthetic osteoporotic L4 (brightest voxel 241 HU,
    make demo's site_c) and excluded it as 0 % covered; dense is the vertebra's own densest tenth."""
    ct, labels = spine_phantom(trabecular_hu=60.0)
    arr = sitk.GetArrayFromImage(ct)
    arr[arr >= 300] = 230  # cortex and arch at 230 HU: above 'not bone', under a fixed 250
    weak = sitk.GetImageFromArray(arr)
    weak.CopyInformation(ct)
    assert all(isinstance(r, VertebraCrop) for r in run(weak, labels).values())


def test_the_weakest_bone_of_an_osteoporosis_clinic_is_bone(spine_phantom):
    """`strong_shift`'s osteoporosis clinic (5 mm slices, CT slope 0.85) has patients at T -5 whose whole vertebra's
    90th percentile is 120-149 HU. A 'not bone' limit of 150 HU quarantined them as a wrong label map: the
    patients screening is for. Soft tissue under a vertebra id (muscle, ~60 HU) is still not bone."""
    ct, labels = spine_phantom(trabecular_hu=20.0)
    arr = sitk.GetArrayFromImage(ct)
    arr[arr >= 300] = 125  # cortex and arch at 125 HU
    weak = sitk.GetImageFromArray(arr)
    weak.CopyInformation(ct)
    assert all(isinstance(r, VertebraCrop) for r in run(weak, labels).values())
    arr[arr >= 100] = 60
    muscle = sitk.GetImageFromArray(arr)
    muscle.CopyInformation(ct)
    for r in run(muscle, labels).values():
        assert isinstance(r, LevelExclusion) and r.reason.startswith("implausible anatomy: not bone (90th percentile")
