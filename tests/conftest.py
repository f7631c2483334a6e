"""Shared fixtures: a tiny synthetic spine CT and a tiny site folder in the README format.

``spine_phantom(...)`` -> (ct, labels) SimpleITK images: air (-1000 HU) with L1..L4 blocky vertebrae
(body box with a cortical shell and noisy trabecular interior, plus a posterior arch behind a spinal
canal, all one label id), L1 most superior (+z in LPS), L4 lowest.

``write_dicom_series(ct, folder, ...)`` writes a CT as a DICOM series (optionally with a slice missing,
a slice shifted, or raw stored values); ``make_site(name, n_labeled, n_unlabeled, ...)`` -> Path of a valid site folder (studies.csv, ct/,
labels/, dxa.csv) under the test's tmp_path; tests then break one thing to test one failure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from osteo_model.constants import LABEL_PRESETS, LEVELS

SPACING_MM = 2.0
SHAPE_ZYX = (60, 32, 36)
BODY_X, BODY_Y, BODY_H = (10, 26), (6, 18), 10   # body box in voxels (x, y ranges; height in z)
CANAL_Y, ARCH_Y = (18, 22), (22, 26)             # canal behind the body, lamina/spinous behind it
LEVEL_Z0 = {"L4": 4, "L3": 18, "L2": 32, "L1": 46}
BODY_VOLUME_ML = (BODY_X[1] - BODY_X[0]) * (BODY_Y[1] - BODY_Y[0]) * BODY_H * SPACING_MM**3 / 1000


def spine_phantom(label_map: Mapping[str, int] = LABEL_PRESETS["totalseg_total"], trabecular_hu: float = 150.0,
                  levels: tuple[str, ...] = LEVELS, seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    rng = np.random.default_rng(seed)
    ct = np.full(SHAPE_ZYX, -1000.0, dtype=np.float32)
    ct[:, 2:30, 4:32] = 40.0  # soft tissue, air around it
    labels = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    for level in levels:
        z = slice(LEVEL_Z0[level], LEVEL_Z0[level] + BODY_H)
        body = (z, slice(*BODY_Y), slice(*BODY_X))
        ct[body] = 500.0  # cortical shell
        inner = (slice(z.start + 1, z.stop - 1), slice(BODY_Y[0] + 1, BODY_Y[1] - 1), slice(BODY_X[0] + 1, BODY_X[1] - 1))
        ct[inner] = trabecular_hu + rng.normal(0, 40, ct[inner].shape)
        labels[body] = label_map[level]
        for x in ((BODY_X[0], BODY_X[0] + 3), (BODY_X[1] - 3, BODY_X[1])):  # pedicles beside the canal
            ct[z, slice(*CANAL_Y), slice(*x)] = 400.0
            labels[z, slice(*CANAL_Y), slice(*x)] = label_map[level]
        ct[z, slice(*ARCH_Y), slice(*BODY_X)] = 400.0  # lamina and spinous process
        labels[z, slice(*ARCH_Y), slice(*BODY_X)] = label_map[level]
    images = []
    for arr in (ct.astype(np.int16), labels):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing([SPACING_MM] * 3)
        img.SetOrigin((-30.0, -20.0, 100.0))
        images.append(img)
    return images[0], images[1]


DICOM_UID = "1.2.826.0.1.3680043.2.1125.7"


def write_dicom_series(img: sitk.Image, folder: Path, skip: tuple[int, ...] = (), shift_mm: dict[int, float] | None = None,
                       stored_offset: int = 0) -> Path:
    """One file per slice with ImagePositionPatient/ImageOrientationPatient, as a scanner writes them.

    ``stored_offset`` > 0 writes unsigned stored values (HU + offset) with no rescale: "not HU".
    """
    folder.mkdir(parents=True)
    arr = sitk.GetArrayFromImage(img).astype(np.int32) + stored_offset
    arr = arr.astype(np.uint16 if stored_offset else np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        if k in skip:
            continue
        sl = sitk.GetImageFromArray(arr[k])
        sl.SetSpacing(img.GetSpacing()[:2])
        pos = np.array(img.TransformIndexToPhysicalPoint((0, 0, k))) + [0, 0, (shift_mm or {}).get(k, 0.0)]
        tags = {"0008|0060": "CT", "0020|000d": f"{DICOM_UID}.1", "0020|000e": f"{DICOM_UID}.2", "0008|0018": f"{DICOM_UID}.3.{k + 1}",
                "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": "\\".join(f"{v:.4f}" for v in pos), "0020|0013": str(k + 1)}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(sl)
    return folder


def write_site(root: Path, name: str = "site_t", n_labeled: int = 2, n_unlabeled: int = 1,
               manufacturer: str = "Hologic", suffix: str = ".nii.gz") -> Path:
    site = root / name
    (site / "ct").mkdir(parents=True)
    (site / "labels").mkdir()
    studies, dxa = [], []
    for i in range(n_labeled + n_unlabeled):
        sid, pid = f"s{i:03d}", f"p{i:03d}"
        ct, labels = spine_phantom(trabecular_hu=120.0 + 20 * i, seed=i)
        sitk.WriteImage(ct, str(site / "ct" / f"{sid}{suffix}"))
        sitk.WriteImage(labels, str(site / "labels" / f"{sid}{suffix}"))
        studies.append({"study_id": sid, "patient_id": pid, "ct_date": "2024-03-01", "ct": f"ct/{sid}{suffix}",
                        "labels": f"labels/{sid}{suffix}", "scanner": "Phantom CT"})
        if i < n_labeled:
            dxa.append({"patient_id": pid, "dxa_date": "2024-03-20", "manufacturer": manufacturer, "model": "Horizon A",
                        "bmd_l1": 0.80 + 0.05 * i, "bmd_l2": 0.85, "bmd_l3": 0.90, "bmd_l4": 0.92,
                        "sex": "female", "age": 60 + i})
    pd.DataFrame(studies).to_csv(site / "studies.csv", index=False)
    pd.DataFrame(dxa, columns=["patient_id", "dxa_date", "manufacturer", "model", "bmd_l1", "bmd_l2", "bmd_l3",
                               "bmd_l4", "sex", "age"]).to_csv(site / "dxa.csv", index=False)
    return site


@pytest.fixture
def make_site(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_site(name="site_t", n_labeled=2, n_unlabeled=1, manufacturer="Hologic", suffix=".nii.gz")``."""
    return lambda **kw: write_site(tmp_path, **kw)


@pytest.fixture(name="spine_phantom")
def spine_phantom_fixture() -> Callable[..., tuple[sitk.Image, sitk.Image]]:
    return spine_phantom


@pytest.fixture
def prepare_cfg(tmp_path: Path):
    """Factory: the composed config for preparing ``site_dir`` into ``tmp_path/cache/<name>``, serial radiomics."""
    from osteo_model.config import compose

    def make(site_dir: Path, *overrides: str):
        return compose([f"site.name={site_dir.name}", f"site.dir={site_dir}", f"site.cache_dir={tmp_path / 'cache' / site_dir.name}",
                        "radiomics.n_jobs=1", *overrides])

    return make


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower stamps outgoing messages with the running task's identity; set one for in-process runs."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
