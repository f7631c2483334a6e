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
    level: str
    reason: str


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


def crop_levels(ct: sitk.Image, label_arr: np.ndarray, label_map: Mapping[str, int], crop_cfg) -> list[VertebraCrop | LevelExclusion]:
    """One crop or exclusion per level of ``label_map``, in its order.

    Excluded: a level absent from the mask, a vertebra touching the scan edge (truncated: its body
    and statistics would be incomplete), a body too small to be real, no trabecular core.
    """
    ct_arr = sitk.GetArrayViewFromImage(ct)
    margin = int(crop_cfg.edge_margin_vox)
    results: list[VertebraCrop | LevelExclusion] = []
    for level, box in level_boxes(label_arr, label_map).items():
        if box is None:
            results.append(LevelExclusion(level, f"level missing from label map (no voxel with id {label_map[level]})"))
        elif any(s.start < margin or s.stop > n - margin for s, n in zip(box, label_arr.shape)):
            results.append(LevelExclusion(level, "vertebra touches the edge of the scan (truncated)"))
        else:
            results.append(crop_vertebra(ct, ct_arr, box, label_arr[box] == label_map[level], level, crop_cfg))
    return results
