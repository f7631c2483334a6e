"""Small fake site caches for model tests, written with the real ``write_site_cache``.

Each patient has a true standardised BMD; the trabecular core's mean HU *and* its texture (density of
bright trabecular dots) follow it, so a network can learn sBMD from the crop. A per-site device bias
(on top of the inverse Hui 1997 equation) makes calibration testable.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from osteo_model import bmd as bmdlib
from osteo_model.cache import write_site_cache

FEATURE_NAMES = ["mean", "std", "p10", "p90", "bright_frac", "grad_mean"]


def _crop(rng: np.random.Generator, size: int, sbmd: float) -> tuple[np.ndarray, np.ndarray]:
    zz, yy, xx = np.mgrid[:size, :size, :size] - (size - 1) / 2
    r = np.sqrt(zz**2 + yy**2 + xx**2) / (size / 2)
    mask = np.where(r < 0.85, 1, 0).astype(np.uint8)
    mask[r < 0.7] = 2
    density = np.clip(sbmd, 0.3, 1.6)
    hu = rng.normal(0, 20, (size,) * 3)
    core = mask == 2
    dots = rng.random((size,) * 3) < 0.15 + 0.35 * (density - 0.3)
    hu[core] += 250 * (density - 0.5) + np.where(dots[core], 200, 0)
    hu[mask == 1] += 600
    return hu.astype(np.int16), mask


def _features(crop: np.ndarray, mask: np.ndarray) -> np.ndarray:
    v = crop[mask == 2].astype(np.float32)
    grad = np.abs(np.diff(crop.astype(np.float32), axis=-1))[..., :][mask[..., 1:] == 2]
    return np.array(
        [v.mean(), v.std(), np.percentile(v, 10), np.percentile(v, 90), (v > 150).mean(), grad.mean()],
        dtype=np.float32,
    )


def make_site_cache(
    path: str | Path,
    site: str = "site_a",
    n_patients: int = 24,
    size: int = 16,
    manufacturer: str = "hologic",
    device_bias: float = 0.0,
    labeled_frac: float = 0.75,
    seed: int = 0,
    fov_mm: float | None = None,
    feature_names: list[str] | None = None,
    truth_dir: Path | None = None,
) -> Path:
    """Write a fake cache of ``n_patients`` x 4 vertebrae; return its folder. Its manifest records crops of
    ``size`` voxels over ``fov_mm`` (default: 1 mm voxels); ``feature_names`` (e.g. a real cache's) get the
    fake features repeated over their columns; with ``truth_dir``, each vertebra's true device BMD (without
    the device bias) goes to ``<truth_dir>/<site>.csv`` as osteo-synth writes it."""
    names = FEATURE_NAMES if feature_names is None else list(feature_names)
    rng = np.random.default_rng(seed)
    rows, crops, masks, feats, truth = [], [], [], [], []
    for p in range(n_patients):
        base, age = rng.normal(0.9, 0.2), 50 + (p * 7) % 36  # age apart from rng: the data stay as they were
        labeled = p < int(round(labeled_frac * n_patients))
        for li, level in enumerate(("L1", "L2", "L3", "L4")):
            sbmd_true = base + 0.03 * li + rng.normal(0, 0.02)
            crop, mask = _crop(rng, size, sbmd_true)
            crops.append(crop)
            masks.append(mask)
            feats.append(_features(crop, mask))
            core = crop[mask == 2]
            truth.append({"study_id": f"{site}-s{p:03d}", "level": level, "age": age,
                          "true_bmd_device": float(bmdlib.from_sbmd(sbmd_true, manufacturer))})
            row = {
                "study_id": f"{site}-s{p:03d}", "patient_id": f"{site}-p{p:03d}", "level": level,
                "level_idx": li, "labeled": labeled, "ct_date": "2024-01-01", "scanner": "fake",
                "spacing_mm": "1,1,1", "hu_mean": float(core.mean()), "hu_median": float(np.median(core)),
                "hu_std": float(core.std()), "body_volume_ml": 30.0, "dxa_manufacturer": np.nan,
                "dxa_model": np.nan, "dxa_date": np.nan, "interval_days": np.nan, "bmd": np.nan,
                "sbmd": np.nan, "t_score": np.nan, "category": -1, "sex": "female", "age": 65, "inputs_sha256": np.nan,
            }
            if labeled:
                device_bmd = float(bmdlib.from_sbmd(sbmd_true, manufacturer)) + device_bias
                t = float(bmdlib.t_score(device_bmd, manufacturer))
                row.update(
                    dxa_manufacturer=manufacturer, dxa_model="fake", dxa_date="2024-01-10", interval_days=9,
                    bmd=device_bmd, sbmd=float(bmdlib.to_sbmd(device_bmd, manufacturer)), t_score=t,
                    category=int(bmdlib.category_from_t(t)),
                )
            rows.append(row)
    if truth_dir is not None:
        Path(truth_dir).mkdir(parents=True, exist_ok=True)
        pd.DataFrame(truth).to_csv(Path(truth_dir) / f"{site}.csv", index=False)
    return write_site_cache(
        path, pd.DataFrame(rows), np.stack(crops), np.stack(masks), np.resize(np.stack(feats).T, (len(names), len(rows))).T,
        names,
        {"site": site, "crop": {"size": size, "fov_mm": float(size if fov_mm is None else fov_mm)}},
    )


def copy_cache(src: str | Path, dst: str | Path, rows: np.ndarray, site: str | None = None) -> Path:
    """A copy of the cache at ``src`` with only ``rows`` (indices or a boolean mask), e.g. the same site
    before some of its patients arrived; ``site`` renames it."""
    from osteo_model.cache import SiteCache

    c = SiteCache.open(src)
    rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
    manifest = {**c.manifest, **({"site": site} if site else {})}
    write_site_cache(dst, c.table.iloc[rows].reset_index(drop=True), np.asarray(c.crops)[rows], np.asarray(c.masks)[rows],
                     np.asarray(c.features)[rows], c.feature_names, manifest)
    return Path(dst)
