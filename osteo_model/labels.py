"""Vertebra label conventions: which label id is L1..L4 in a site's masks.

A preset names a tool's convention (constants.LABEL_PRESETS); a custom map overrides it for masks
from anything else.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy import ndimage

from osteo_model.constants import LABEL_PRESETS, LEVELS
from osteo_model.errors import ConfigError


def resolve_label_map(preset: str | None, custom: Mapping[str, int] | None = None) -> dict[str, int]:
    """Level -> label id, from a custom map if given, else the named preset."""
    if custom:
        unknown = sorted(set(custom) - set(LEVELS))
        if unknown:
            raise ConfigError(None, f"site.label_map has unknown levels {unknown}; expected keys among {list(LEVELS)}")
        mapping = {level: int(custom[level]) for level in LEVELS if level in custom}
    elif preset in LABEL_PRESETS:
        mapping = dict(LABEL_PRESETS[preset])
    else:
        raise ConfigError(None, f"unknown site.label_preset {preset!r}; choose one of {sorted(LABEL_PRESETS)} or set site.label_map")
    if len(set(mapping.values())) != len(mapping):
        raise ConfigError(None, f"label map {mapping} gives two levels the same id")
    return mapping


def label_map_from_cfg(site_cfg) -> dict[str, int]:
    """The label map a site's config asks for (``site.label_map`` over ``site.label_preset``)."""
    custom = site_cfg.get("label_map")
    return resolve_label_map(site_cfg.get("label_preset"), dict(custom) if custom else None)


def level_boxes(label_arr: np.ndarray, label_map: Mapping[str, int]) -> dict[str, tuple[slice, ...] | None]:
    """Bounding box (numpy slices) of each level's label in one pass over the volume; None if absent."""
    # Relabel to 1..k so find_objects does not allocate a slot per id up to the largest one; one comparison
    # per level, not a lookup table sized by the largest value (a stray 2**31-1 'ignore' voxel: 8 GiB).
    compact = np.zeros(label_arr.shape, dtype=np.int32)
    for i, label_id in enumerate(label_map.values(), start=1):
        compact[label_arr == label_id] = i
    boxes = ndimage.find_objects(compact, max_label=len(label_map))
    return {level: boxes[i] for i, level in enumerate(label_map)}
