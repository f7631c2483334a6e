"""The prepared per-site cache that training reads: one consolidated, memory-mappable folder.

Layout of ``<cache_dir>/`` (written by ``osteo-prepare``; the incremental per-study entries it is
consolidated from live in ``<cache_dir>/entries/`` and are private to preparation):

- ``index.csv``     one row per vertebra, columns ``INDEX_COLUMNS`` (NaN where unknown, e.g. DXA of
                    unlabeled studies)
- ``crops.npy``     int16 HU, shape (N, S, S, S), isotropic, axes (z, y, x) of the resampled crop
- ``masks.npy``     uint8, same shape: 0 outside the body, 1 vertebral body, 2 trabecular core
- ``features.npy``  float32 (N, F) radiomic texture features of the trabecular core
- ``features.json`` {"names": [...F names...]}
- ``manifest.json`` {"site", "format_version", "crop": {...}, "n_vertebrae", "n_labeled", ...}

Row i of every array is row i of index.csv.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from osteo_model.atomic import remove_stale_temporaries, replace, sync_file, sync_folder, temporary_sibling
from osteo_model.errors import InputError

FORMAT_VERSION = 1

INDEX_COLUMNS: tuple[str, ...] = (
    "study_id",        # the site's study key (stays at the site)
    "patient_id",      # the site's patient key (stays at the site; used for patient-level splits)
    "level",           # "L1".."L4"
    "level_idx",       # 0..3
    "labeled",         # True when paired with a valid DXA measurement of this level
    "ct_date",
    "scanner",         # CT manufacturer/model if known
    "spacing_mm",      # original CT spacing "x,y,z"
    "hu_mean",         # trabecular core HU statistics (original CT resolution)
    "hu_median",
    "hu_std",
    "body_volume_ml",
    "dxa_manufacturer",  # key of constants.HUI_1997
    "dxa_model",
    "dxa_date",
    "interval_days",
    "bmd",             # device areal BMD of this level, g/cm^2
    "sbmd",            # standardised BMD (Hui 1997), g/cm^2
    "t_score",         # T-score of this level on its own level's reference of the device, by sex (dxa.level_labels)
    "category",        # 0 normal, 1 osteopenia, 2 osteoporosis (from t_score); -1 unknown
    "sex",             # "female" | "male" | ""
    "age",
    "inputs_sha256",   # digest of the study's CT and label files when prepared (prepare.inputs_sha256);
                       # absent from caches prepared before it was recorded
)


@dataclass
class SiteCache:
    """Read-only view of one site's prepared cache; arrays are memory-mapped, not loaded."""

    path: Path
    table: pd.DataFrame
    crops: np.ndarray
    masks: np.ndarray
    features: np.ndarray
    feature_names: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def site(self) -> str:
        return str(self.manifest.get("site", self.path.name))

    def __len__(self) -> int:
        return len(self.table)

    @classmethod
    def open(cls, path: str | Path) -> "SiteCache":
        path = Path(path)
        manifest_file = path / "manifest.json"
        if not manifest_file.is_file():
            raise InputError(path, "no prepared cache here (manifest.json missing): run osteo-prepare first")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise InputError(
                manifest_file,
                f"cache format {manifest.get('format_version')} is not {FORMAT_VERSION}: re-run osteo-prepare",
            )
        table = pd.read_csv(path / "index.csv", keep_default_na=True,  # a column of blanks stays text
                            dtype={"study_id": str, "patient_id": str, "sex": str, "inputs_sha256": str})
        table["sex"] = table["sex"].fillna("")
        crops = np.load(path / "crops.npy", mmap_mode="r")
        masks = np.load(path / "masks.npy", mmap_mode="r")
        features = np.load(path / "features.npy", mmap_mode="r")
        names = json.loads((path / "features.json").read_text())["names"]
        n = len(table)
        for name, arr in (("crops.npy", crops), ("masks.npy", masks), ("features.npy", features)):
            if arr.shape[0] != n:
                raise InputError(path / name, f"{arr.shape[0]} rows but index.csv has {n}: cache is inconsistent")
        return cls(path, table, crops, masks, features, list(names), manifest)


def write_site_cache(
    path: str | Path,
    table: pd.DataFrame,
    crops: np.ndarray,
    masks: np.ndarray,
    features: np.ndarray,
    feature_names: list[str],
    manifest: dict[str, Any],
) -> Path:
    """Write a consolidated cache atomically: readers see the old one or the new one, never a mix."""
    path = Path(path)
    missing = [c for c in INDEX_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"cache table lacks columns {missing}")
    n = len(table)
    if not (len(crops) == len(masks) == len(features) == n):
        raise ValueError("crops, masks, features and table must have the same number of rows")
    if features.ndim != 2 or features.shape[1] != len(feature_names):
        raise ValueError("features must be (N, F) with F feature names")
    remove_stale_temporaries(path.parent, glob.escape(path.name))
    tmp = temporary_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    table.loc[:, list(INDEX_COLUMNS)].to_csv(tmp / "index.csv", index=False)
    np.save(tmp / "crops.npy", np.asarray(crops, dtype=np.int16))
    np.save(tmp / "masks.npy", np.asarray(masks, dtype=np.uint8))
    np.save(tmp / "features.npy", np.asarray(features, dtype=np.float32))
    (tmp / "features.json").write_text(json.dumps({"names": list(feature_names)}))
    full_manifest = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "n_vertebrae": n,
        "n_labeled": int(table["labeled"].astype(bool).sum()),
    }
    (tmp / "manifest.json").write_text(json.dumps(full_manifest, indent=2, default=str))
    # Keep the entries folder (incremental store) where it is: move the consolidated files only.
    # The manifest goes first and comes back last, so an interrupted swap reads as "no cache", never a mix.
    # Each file is on disk before the folder's renames are flushed, so a power cut cannot leave a complete
    # manifest over empty arrays.
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").unlink(missing_ok=True)
    sync_folder(path)
    data_files = ("index.csv", "crops.npy", "masks.npy", "features.npy", "features.json")
    for f in (*data_files, "manifest.json"):
        sync_file(tmp / f)
    for f in data_files:
        os.replace(tmp / f, path / f)
    replace(tmp / "manifest.json", path / "manifest.json")  # last: marks the cache complete
    shutil.rmtree(tmp, ignore_errors=True)
    return path
