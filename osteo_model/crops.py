"""Vertebral body crops: find each level's body, measure its trabecular HU, crop a fixed physical FOV.

Label maps such as TotalSegmentator ``total`` cover the whole vertebra (body plus posterior elements).
The body is the part anterior of the spinal canal, found in physical LPS coordinates (+y = posterior),
so it does not depend on the CT's voxel order. Statistics are taken at the CT's own resolution; the
crop is resampled with SimpleITK onto an isotropic, LPS-aligned grid centred on the body.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from osteo_model.constants import (BODY_MIN_FRACTION, BONE_COVERAGE_MARGIN_MM, LEVELS, MAX_BODY_SHARE_EXCESS,
                                   MAX_SECOND_PIECE, MIN_BONE_COVERAGE, MIN_RELATIVE_VOLUME,
                                   SPINE_MAX_AXIAL_OFFSET_MM, VERTEBRA_MAX_VOLUME_ML, VERTEBRA_MIN_BONE_HU)
from osteo_model.errors import ConfigError
from osteo_model.labels import level_boxes

AIR_HU = -1024.0
"""Fill value where a crop reaches beyond the scan."""
MIDLINE_HALF_WIDTH_MM = 2.5
"""Half width of the sagittal band searched for the spinal canal."""
BODY = 1
CORE = 2


@dataclass
class VertebraCrop:
    level: str
    crop: np.ndarray      # int16 HU (S, S, S), axes (z, y, x) of the LPS-aligned crop grid
    mask: np.ndarray      # uint8 (S, S, S): 0 outside, BODY, CORE (trabecular core)
    hu_mean: float        # trabecular core, original CT resolution
    hu_median: float
    hu_std: float
    body_volume_ml: float


@dataclass(frozen=True)
class LevelExclusion:
    """A level left out; ``reason`` is one line a radiologist can read (shown in quarantine.csv and reports)."""

    level: str
    reason: str


WRONG_LABELS = "wrong label map or preset?"
TRUNCATED = "truncated by the scan edge"


def _lps_points(img: sitk.Image, zyx: np.ndarray) -> np.ndarray:
    """Physical LPS coordinates (n, 3) of numpy (z, y, x) voxel indices (n, 3)."""
    spacing = np.asarray(img.GetSpacing())
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    return np.asarray(img.GetOrigin()) + (zyx[:, ::-1] * spacing) @ direction.T


def anterior_body(mask: np.ndarray, zyx: np.ndarray, points: np.ndarray, step_mm: float) -> np.ndarray:
    """Keep the vertebral body of a whole-vertebra mask: the part anterior of the spinal canal.

    ``zyx`` are the mask's voxels (``np.argwhere`` order) and ``points`` their LPS positions. Along a
    mid-sagittal band, the mask runs body -> canal (empty) -> laminae/spinous process; the first gap
    along +y (posterior) marks the back of the body. Masks without a gap (body-only labels) are kept
    whole. The largest connected piece is returned.
    """
    x, y = points[:, 0], points[:, 1]
    mid_y = np.sort(y[np.abs(x - np.median(x)) <= max(MIDLINE_HALF_WIDTH_MM, step_mm / 2)])
    gaps = np.flatnonzero(np.diff(mid_y) > 1.5 * step_mm)
    body = mask.copy()
    if len(gaps):
        posterior = zyx[y > mid_y[gaps[0]] + 1e-3]
        body[tuple(posterior.T)] = False
    pieces, n = ndimage.label(body)
    if n > 1:
        body = pieces == 1 + int(np.argmax(ndimage.sum_labels(body, pieces, range(1, n + 1))))
    return body


def check_crop_cfg(crop_cfg) -> None:
    """Refuse crop settings that are not positive numbers (``edge_margin_vox`` may be 0)."""
    for key in ("fov_mm", "size", "trabecular_erosion_mm", "min_body_volume_ml", "edge_margin_vox"):
        try:
            value = float(crop_cfg[key])
        except (TypeError, ValueError, KeyError):
            raise ConfigError(None, f"crop.{key} must be a number, got {crop_cfg.get(key)!r}") from None
        if value < 0 or (value == 0 and key in ("fov_mm", "size")):
            raise ConfigError(None, f"crop.{key} must be positive, got {value}")


def crop_spacing_mm(crop_cfg) -> float:
    """Isotropic voxel size of a crop: the physical field of view over the crop's voxels."""
    return float(crop_cfg.fov_mm) / int(crop_cfg.size)


def _crop_grid(centre: np.ndarray, fov_mm: float, size: int) -> sitk.Image:
    spacing = fov_mm / size
    ref = sitk.Image([size] * 3, sitk.sitkUInt8)
    ref.SetSpacing([spacing] * 3)
    ref.SetOrigin(tuple(centre - (fov_mm - spacing) / 2))
    return ref


def crop_vertebra(ct: sitk.Image, ct_arr: np.ndarray, box: tuple[slice, ...], level_mask: np.ndarray,
                  level: str, crop_cfg) -> VertebraCrop | LevelExclusion:
    """Crop one level whose mask (``level_mask``, the label's bounding ``box`` of the CT) is known."""
    spacing_zyx = np.asarray(ct.GetSpacing())[::-1]
    pad = 1  # background around the box, so the body's surface is seen by the distance transform
    mask = np.pad(level_mask, pad)
    corner = np.array([s.start for s in box]) - pad
    zyx = np.argwhere(mask)
    body = anterior_body(mask, zyx, _lps_points(ct, zyx + corner), float(spacing_zyx.max()))
    volume_ml = float(body.sum() * np.prod(spacing_zyx) / 1000.0)
    fraction = float(body.sum() / mask.sum())
    if fraction < BODY_MIN_FRACTION:  # before the size check: the cause, not the symptom
        return LevelExclusion(level, f"implausible anatomy: the part taken as the vertebral body ({volume_ml:.1f} ml) is "
                                     f"{fraction:.0%} of the vertebra, a body is over {BODY_MIN_FRACTION:.0%}: front and back "
                                     "swapped (header orientation or flipped label map)?")
    if volume_ml < crop_cfg.min_body_volume_ml:
        return LevelExclusion(level, f"tiny or empty vertebral body ({volume_ml:.1f} ml < {crop_cfg.min_body_volume_ml} ml)")
    core = np.zeros_like(body)
    inner = tuple(slice(s.start - 1, s.stop + 1) for s in ndimage.find_objects(body.view(np.uint8))[0])
    core[inner] = ndimage.distance_transform_edt(body[inner], sampling=spacing_zyx) > crop_cfg.trabecular_erosion_mm
    if not core.any():
        return LevelExclusion(level, f"no trabecular core left after {crop_cfg.trabecular_erosion_mm} mm erosion")
    hu = ct_arr[tuple((np.argwhere(core) + corner).T)].astype(np.float64)

    labels = np.where(core, CORE, np.where(body, BODY, 0)).astype(np.uint8)
    centre = _lps_points(ct, np.argwhere(body) + corner).mean(axis=0)
    crop, crop_mask = _resample_to_crop(ct, labels, corner, centre, crop_cfg)
    return VertebraCrop(level, crop, crop_mask, float(hu.mean()), float(np.median(hu)), float(hu.std()), volume_ml)


def _resample_to_crop(ct: sitk.Image, labels: np.ndarray, corner: np.ndarray, centre: np.ndarray,
                      crop_cfg) -> tuple[np.ndarray, np.ndarray]:
    """CT (linear) and body/core labels (nearest neighbour; placed at ``corner`` of the CT) on the crop grid."""
    label_img = sitk.GetImageFromArray(labels)
    label_img.SetSpacing(ct.GetSpacing())
    label_img.SetDirection(ct.GetDirection())
    label_img.SetOrigin(ct.TransformIndexToPhysicalPoint([int(c) for c in corner[::-1]]))
    grid = _crop_grid(centre, float(crop_cfg.fov_mm), int(crop_cfg.size))
    crop = sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    crop_mask = sitk.Resample(label_img, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    crop_arr = np.clip(np.rint(sitk.GetArrayFromImage(crop)), -32768, 32767).astype(np.int16)
    return crop_arr, sitk.GetArrayFromImage(crop_mask)


def main_component(label_arr: np.ndarray, box: tuple[slice, ...], label_id: int) -> tuple[tuple[slice, ...], np.ndarray] | str:
    """The level's largest 26-connected piece: its bounding box in the volume and its mask in that box.

    A stray fragment of the same id elsewhere (a segmentation speck at the scan edge) neither truncates
    nor enlarges the level. A second piece over MAX_SECOND_PIECE of the largest means the vertebra is cut
    apart or two levels share the id: measuring either piece would be wrong, so the reason is returned.
    """
    mask = label_arr[box] == label_id
    pieces, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n > 1:
        sizes = ndimage.sum_labels(mask, pieces, range(1, n + 1))
        largest, second = np.argsort(sizes)[::-1][:2]
        if sizes[second] > MAX_SECOND_PIECE * sizes[largest]:
            return (f"label in {n} pieces: the second largest is {sizes[second] / sizes[largest]:.0%} of the largest "
                    f"(stray fragments stay under {MAX_SECOND_PIECE:.0%}): a vertebra cut apart or two levels under one id?")
        mask = pieces == 1 + largest
    inner = ndimage.find_objects(mask.view(np.uint8))[0]
    return tuple(slice(b.start + i.start, b.start + i.stop) for b, i in zip(box, inner)), mask[inner]


def long_axis(ct: sitk.Image) -> int:
    """The array axis (z, y, x order) that runs closest to the body's head-feet axis (LPS z)."""
    direction = np.asarray(ct.GetDirection()).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(direction[2])))


def bone_coverage(ct_arr: np.ndarray, box: tuple[slice, ...], mask: np.ndarray, spacing_zyx: np.ndarray,
                  axial: int, dense_hu: float) -> float:
    """Share of the dense bone (at or above ``dense_hu``) within BONE_COVERAGE_MARGIN_MM of the level's box, in
    the slices the level spans (``axial``: the head-feet array axis; the vertebrae above and below are not its
    own), that lies inside its mask. A mask off its vertebra leaves much of that bone outside."""
    reach = np.ceil(BONE_COVERAGE_MARGIN_MM / spacing_zyx).astype(int)
    reach[axial] = 0
    around = tuple(slice(max(s.start - r, 0), min(s.stop + r, n)) for s, r, n in zip(box, reach, ct_arr.shape))
    inside = np.zeros([s.stop - s.start for s in around], bool)
    inside[tuple(slice(s.start - a.start, s.stop - a.start) for s, a in zip(box, around))] = mask
    bone = np.asarray(ct_arr[around]) >= dense_hu
    return float((bone & inside).sum() / max(int(bone.sum()), 1))


def implausible_anatomy(ct_arr: np.ndarray, box: tuple[slice, ...], mask: np.ndarray, spacing_zyx: np.ndarray,
                        crop_cfg, axial: int) -> str | None:
    """Why a labelled level cannot be a lumbar vertebra (too large, not bone, off its bone), or None.

    Levels too small to judge are left to ``crop_vertebra``, which excludes them as tiny.
    """
    volume_ml = float(mask.sum() * np.prod(spacing_zyx) / 1000.0)
    if volume_ml < crop_cfg.min_body_volume_ml:
        return None
    if volume_ml > VERTEBRA_MAX_VOLUME_ML:
        return f"implausible anatomy: {volume_ml:.0f} ml, larger than a lumbar vertebra (up to {VERTEBRA_MAX_VOLUME_ML:.0f} ml); {WRONG_LABELS}"
    bone = float(np.percentile(ct_arr[box][mask], 90))
    if bone < VERTEBRA_MIN_BONE_HU:
        return (f"implausible anatomy: not bone (90th percentile {bone:.0f} HU, a vertebra has cortex above "
                f"{VERTEBRA_MIN_BONE_HU:.0f} HU); {WRONG_LABELS}")
    if (share := bone_coverage(ct_arr, box, mask, spacing_zyx, axial, dense_hu=bone)) < MIN_BONE_COVERAGE:
        return (f"implausible anatomy: the label holds {share:.0%} of the dense bone around it, a vertebra's over "
                f"{MIN_BONE_COVERAGE:.0%}: label map mirrored or shifted against the CT?")
    return None


def misplaced_levels(centres: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Levels whose LPS centre contradicts the others: off the spine's axis, or L1..L4 not head to feet.

    An order violation cannot tell which id is wrong, so it excludes every level checked (+z is superior).
    """
    reasons: dict[str, str] = {}
    if len(centres) >= 3:
        for level, centre in centres.items():
            others = np.median([c for lv, c in centres.items() if lv != level], axis=0)
            offset = float(np.hypot(*(centre[:2] - others[:2])))
            if offset > SPINE_MAX_AXIAL_OFFSET_MM:
                reasons[level] = f"implausible anatomy: {offset:.0f} mm off the axis of the other vertebrae; {WRONG_LABELS}"
    ordered = [lv for lv in LEVELS if lv in centres and lv not in reasons]
    for upper, lower in zip(ordered, ordered[1:]):
        if centres[upper][2] <= centres[lower][2]:
            reason = f"implausible anatomy: {lower} lies above {upper} (L1 to L4 run head to feet); {WRONG_LABELS}"
            return reasons | {lv: reason for lv in ordered}
    return reasons


def _others_median(values: Mapping[str, float]) -> dict[str, float]:
    """Each level's yardstick: the median of the other levels' values in the same scan (with two others or more)."""
    return {level: float(np.median([v for lv, v in values.items() if lv != level])) for level in values
            if len(values) >= 3}


def partial_levels(volumes_ml: Mapping[str, float]) -> dict[str, str]:
    """Levels whose label is too small beside the other levels of the scan to cover a whole vertebra."""
    return {level: (f"implausible anatomy: {volumes_ml[level]:.0f} ml, {volumes_ml[level] / median:.0%} of the other "
                    f"levels' median ({median:.0f} ml; a whole vertebra is over {MIN_RELATIVE_VOLUME:.0%}): the label "
                    "covers part of the vertebra, its rest labelled as a neighbour?")
            for level, median in _others_median(volumes_ml).items() if volumes_ml[level] < MIN_RELATIVE_VOLUME * median}


def swollen_bodies(shares: Mapping[str, float]) -> dict[str, str]:
    """Levels whose body takes a larger share of the vertebra than the other levels' bodies do of theirs."""
    return {level: (f"implausible anatomy: the part taken as the vertebral body is {shares[level]:.0%} of the "
                    f"vertebra, the other levels' {median:.0%}: part of a neighbour's arch under this id?")
            for level, median in _others_median(shares).items() if shares[level] > median + MAX_BODY_SHARE_EXCESS}


def _at_edge(box: tuple[slice, ...], shape: tuple[int, ...], margin: int) -> bool:
    """Whether ``box`` comes within ``margin`` voxels of the scan edge."""
    return any(s.start < margin or s.stop > n - margin for s, n in zip(box, shape))


def crop_levels(ct: sitk.Image, label_arr: np.ndarray, label_map: Mapping[str, int], crop_cfg) -> list[VertebraCrop | LevelExclusion]:
    """One crop or exclusion per level of ``label_map``, in its order.

    Each level is its label's main connected component. Excluded: a level absent from the mask or in two
    large pieces, a vertebra touching the scan edge (truncated: its body and statistics would be incomplete),
    a level whose anatomy is implausible (volume, bone HU, its mask off the bone around it, position and size
    against the other levels: a wrong label preset, a mirrored map, a boundary put mid-body or too high), a
    body too small to be real or too small a share of its vertebra, no trabecular core.
    """
    ct_arr = sitk.GetArrayViewFromImage(ct)
    spacing_zyx = np.asarray(ct.GetSpacing())[::-1]
    margin, axial = int(crop_cfg.edge_margin_vox), long_axis(ct)
    results: dict[str, VertebraCrop | LevelExclusion] = {}
    found: dict[str, tuple[tuple[slice, ...], np.ndarray]] = {}
    for level, box in level_boxes(label_arr, label_map).items():
        if box is None:
            results[level] = LevelExclusion(level, f"missing from the label map (no voxel with id {label_map[level]})")
            continue
        component = main_component(label_arr, box, label_map[level])
        if isinstance(component, str):  # a vertebra cut by the scan edge may fall apart: say truncated first
            results[level] = LevelExclusion(level, TRUNCATED if _at_edge(box, label_arr.shape, margin) else component)
            continue
        box, mask = component
        reason = (TRUNCATED if _at_edge(box, label_arr.shape, margin)
                  else implausible_anatomy(ct_arr, box, mask, spacing_zyx, crop_cfg, axial))
        if reason:
            results[level] = LevelExclusion(level, reason)
        else:
            found[level] = box, mask
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    volumes = {level: float(mask.sum()) * voxel_ml for level, (_, mask) in found.items()}
    centres = {level: _lps_points(ct, np.argwhere(mask).mean(axis=0, keepdims=True) + [s.start for s in box])[0]
               for level, (box, mask) in found.items() if volumes[level] >= crop_cfg.min_body_volume_ml}
    for level, reason in (partial_levels({lv: volumes[lv] for lv in centres}) | misplaced_levels(centres)).items():
        results[level] = LevelExclusion(level, reason)
    for level, (box, mask) in found.items():
        if level not in results:
            results[level] = crop_vertebra(ct, ct_arr, box, mask, level, crop_cfg)
    shares = {lv: r.body_volume_ml / volumes[lv] for lv, r in results.items() if isinstance(r, VertebraCrop)}
    for level, reason in swollen_bodies(shares).items():
        results[level] = LevelExclusion(level, reason)
    return [results[level] for level in label_map]
