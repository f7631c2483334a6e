"""Per-site acquisition: the CT scanner's effects on a phantom and the site's DXA device.

A site profile holds the CT geometry (in-plane pixel, slice thickness, orientation), HU calibration
(slope/offset), noise, reconstruction blur, and the DXA manufacturer/model with its precision and the
systematic error left after Hui 1997 standardisation. Sites named in ``synth.profiles`` use those
values; any other site gets a profile drawn deterministically from ``synth.random_profile``.
"""
from __future__ import annotations

import zlib
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from scipy.ndimage import gaussian_filter

from osteo_model.bmd import normalise_manufacturer
from osteo_model.errors import ConfigError

HU_MIN, HU_MAX = -1024, 3071  # the 12-bit range CT scanners store
DIRECTIONS = {"lps": (1.0, 1.0, 1.0), "ras": (-1.0, -1.0, 1.0)}
"""Axis signs of the stored image: 'ras' is how dcm2niix-style NIfTI often comes (x and y flipped)."""


def site_seed(seed: int, site: str) -> list[int]:
    """Stable per-site seed material: adding or renaming one site leaves the others unchanged."""
    return [int(seed), zlib.crc32(site.encode())]


def site_profile(synth: DictConfig, site: str) -> dict[str, Any]:
    """The site's scanner and DXA profile (configured, else drawn from ``random_profile``)."""
    if site in synth.profiles:
        profile = OmegaConf.to_container(synth.profiles[site], resolve=True)
    else:
        rnd = synth.random_profile
        rng = np.random.default_rng(site_seed(synth.seed, site) + [1])
        manufacturer, model = rnd.dxa_devices[int(rng.integers(len(rnd.dxa_devices)))]
        profile = {
            "scanner": str(rnd.scanners[int(rng.integers(len(rnd.scanners)))]),
            "direction": "lps",
            "dxa_manufacturer": str(manufacturer),
            "dxa_model": str(model),
            **{key: round(float(rng.uniform(*rnd[key])), 3) for key in
               ("inplane_mm", "slice_mm", "hu_slope", "hu_offset", "noise_hu", "blur_mm", "dxa_noise", "dxa_bias",
                "dxa_drift_per_year", "contrast_fraction")},
        }
    if normalise_manufacturer(profile["dxa_manufacturer"]) is None:
        raise ConfigError(None, f"synth profile {site}: unknown DXA manufacturer {profile['dxa_manufacturer']!r}")
    if profile["direction"] not in DIRECTIONS:
        raise ConfigError(None, f"synth profile {site}: direction must be one of {sorted(DIRECTIONS)}")
    return profile


def render_spacing(profile: dict[str, Any]) -> tuple[tuple[float, float, float], int]:
    """Fine (z, y, x) grid the phantom is rendered on, and how many fine slices make one CT slice."""
    inplane = float(profile["inplane_mm"])
    per_slice = max(1, int(round(float(profile["slice_mm"]) / inplane)))
    return (float(profile["slice_mm"]) / per_slice, inplane, inplane), per_slice


def acquire(hu: np.ndarray, labels: np.ndarray, per_slice: int, profile: dict[str, Any],
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Scanner effects on a true-HU phantom: slice integration, blur, correlated noise, calibration.

    Labels are sampled at slice centres (nearest neighbour), as a segmentation of the CT would be.
    """
    n = hu.shape[0] // per_slice
    hu = hu[: n * per_slice].reshape(n, per_slice, *hu.shape[1:]).mean(axis=1)
    labels = labels[per_slice // 2: n * per_slice: per_slice]
    inplane, thickness = float(profile["inplane_mm"]), float(profile["slice_mm"])
    blur = float(profile["blur_mm"])
    hu = gaussian_filter(hu, sigma=(0.5 * blur / thickness, blur / inplane, blur / inplane))
    noise = gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), sigma=(0.3, 0.7, 0.7))
    level = float(profile["noise_hu"]) * rng.uniform(0.85, 1.2)  # patient size varies the dose
    hu = hu + noise * (level / (noise.std() + 1e-12))
    hu = float(profile["hu_slope"]) * hu + float(profile["hu_offset"])
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16), labels
