"""Radiomic texture features of the trabecular core (the texture feature pool for self-supervision).

pyradiomics with the parameter YAML of ``configs/radiomics``. Preparation runs it inside its per-study
process pool (``osteo_model.prepare``), one extractor per worker process. Feature names and their
order are fixed by the parameter file and checked on every crop, so feature column j means the same
thing in every site's cache.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

import osteofl.configs
from osteo_model.crops import CORE
from osteo_model.errors import ConfigError, InputError
from osteo_model.pools import usable_cpus

CONFIG_DIR = Path(osteofl.configs.__file__).resolve().parent / "radiomics"


def _silence() -> None:
    """pyradiomics logs every extraction at INFO and warns per crop; keep site logs clean."""
    import radiomics

    radiomics.setVerbosity(logging.CRITICAL + 1)
    logging.getLogger("radiomics").setLevel(logging.ERROR)


def params_path(radiomics_cfg) -> Path:
    """The pyradiomics parameter file: absolute, or relative to configs/radiomics."""
    path = Path(radiomics_cfg.params_file)
    path = path if path.is_absolute() else CONFIG_DIR / path
    if not path.is_file():
        raise ConfigError(path, "pyradiomics parameter file not found (radiomics.params_file)")
    return path


def params_digest(radiomics_cfg) -> str:
    """Content hash of the extraction settings (part of every cache entry's key)."""
    return hashlib.sha256(params_path(radiomics_cfg).read_bytes()).hexdigest()


def n_workers(group_cfg) -> int:
    """A config group's ``n_jobs`` (radiomics, synth, predict): 0 = all cores this process may use."""
    n = int(group_cfg.n_jobs)
    return n if n > 0 else usable_cpus()


class FeatureExtractor:
    """One pyradiomics extractor; ``names`` is the fixed feature order."""

    def __init__(self, params_file: str | Path, spacing_mm: float) -> None:
        _silence()
        from radiomics.featureextractor import RadiomicsFeatureExtractor

        try:
            self._extractor = RadiomicsFeatureExtractor(str(params_file))
        except Exception as exc:  # pyradiomics validates the YAML with its own schema errors
            raise ConfigError(params_file, f"invalid pyradiomics parameters ({exc})") from None
        self.spacing_mm = spacing_mm
        self.names = list(self._run(*_probe_crop()))

    def _run(self, crop: np.ndarray, mask: np.ndarray) -> dict[str, float]:
        image = sitk.GetImageFromArray(crop.astype(np.float32))
        roi = sitk.GetImageFromArray((mask == CORE).astype(np.uint8))
        for img in (image, roi):
            img.SetSpacing([self.spacing_mm] * 3)
        result = self._extractor.execute(image, roi, label=1)  # the trabecular core, whatever params say
        return {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}

    def extract(self, crop: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Feature vector (float32, ``len(names)``) of one crop's trabecular core."""
        try:
            values = self._run(crop, mask)
        except (ValueError, RuntimeError) as exc:
            raise InputError(None, f"radiomics failed on the trabecular core ({exc})") from None
        if list(values) != self.names:
            raise RuntimeError("pyradiomics returned features in an unexpected order")
        return np.fromiter(values.values(), dtype=np.float32, count=len(self.names))

    def extract_many(self, crops: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, list[str | None]]:
        """Features (k, F) and, per crop, None or why it failed (its row is then NaN)."""
        out = np.full((len(crops), len(self.names)), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(crops)
        for i, (crop, mask) in enumerate(zip(crops, masks)):
            try:
                out[i] = self.extract(crop, mask)
            except InputError as exc:
                errors[i] = exc.reason
        return out, errors


def _probe_crop() -> tuple[np.ndarray, np.ndarray]:
    """A small textured cube: enough to make pyradiomics list its enabled features."""
    rng = np.random.default_rng(0)
    crop = rng.normal(150, 50, (12, 12, 12)).astype(np.float32)
    mask = np.zeros(crop.shape, np.uint8)
    mask[3:9, 3:9, 3:9] = CORE
    return crop, mask


@functools.lru_cache(maxsize=4)
def extractor_for(params_file: str, spacing_mm: float) -> FeatureExtractor:
    """This process's extractor for these settings (built once per worker process, then reused)."""
    return FeatureExtractor(params_file, spacing_mm)
