"""Training data of one site: patient-level splits over a prepared cache and a torch Dataset of crops.

Splits are by patient (all vertebrae and studies of a patient fall in one split), deterministic from
the split seed (``data.split_seed``, else ``seed``) and the site name. ``data.label_fraction`` keeps that
fraction of the training patients' labels (the few-labels experiment); the rest of the labeled studies
stay usable for self-supervision.
``splits["unlabeled"]`` (the SSL pool) is every row except those of val/test patients.

A deployed site pins its split (``SPLIT_FILE`` in its state folder): a patient keeps the split it was
first given, and only new patients are split afresh. Without the pin, one more patient in a re-prepared
cache reshuffles every patient's split, and patients the site's model trained on become validation and
test patients.
"""
from __future__ import annotations

import hashlib
import json
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from osteo_model.atomic import atomic_file
from osteo_model.bmd import sex_codes
from osteo_model.cache import SiteCache
from osteo_model.calibration import check_manufacturer
from osteo_model.errors import ConfigError, StateError

HU_CLIP = (-300.0, 1500.0)
HU_CENTER, HU_SCALE = 100.0, 200.0
"""HU clipped to fat .. dense cortex, then (HU - 100) / 200: trabecular bone (about -50..350 HU) spans
about 2 units. Absolute HU is kept (not per-crop normalised) because mean trabecular HU carries much of
the BMD signal."""
MASK_SCALE = 2.0
"""Mask channel: 0 outside, 0.5 vertebral body, 1 trabecular core."""
SPLIT_FILE = "patient_split.json"
"""A deployed site's pinned split, in its state folder: a random id, the split settings and each patient's
split (patient ids: it never leaves the site)."""
JITTER_SCALE, JITTER_SHIFT = 0.03, 0.05
"""Texture-safe intensity jitter: +-3 % gain and +-0.05 (10 HU) offset, no blurring."""


@dataclass
class SiteData:
    """One site's cache and its row-index splits; ``manufacturer`` is the site's DXA device."""

    cache: SiteCache
    splits: dict[str, np.ndarray]
    manufacturer: str
    split_id: str | None = None  # the id of the pinned split it follows (SPLIT_FILE), None where unpinned

    @property
    def site(self) -> str:
        return self.cache.site

    def patients(self, split: str) -> int:
        """Number of patients in ``split`` (0 for a split the site does not have): the count a site's
        minimum cohort is judged on, and what its estimate of its own offset averages over (a patient's
        vertebrae and studies share one error)."""
        rows = self.splits.get(split, np.array([], dtype=int))
        return int(self.cache.table["patient_id"].astype(str).iloc[rows].nunique()) if len(rows) else 0


def _split_patients(patients: np.ndarray, fractions, rng: np.random.Generator) -> dict[str, np.ndarray]:
    order = rng.permutation(patients)
    n = len(order)
    n_train = int(round(float(fractions.train) * n))
    n_val = int(round(float(fractions.val) * n))
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}


def patients_sha256(data: "SiteData", split: str) -> str:
    """Fingerprint of the patients in ``split``. A site model's card records its validation patients', so
    osteo-predict can tell whether they are still the patients the model was selected on and never
    trained on (a changed split or a re-prepared cache with new patients moves patients between splits)."""
    rows = data.splits.get(split, np.array([], dtype=int))
    patients = sorted(set(data.cache.table["patient_id"].astype(str).iloc[rows]))
    return hashlib.sha256("\n".join(patients).encode()).hexdigest()


def split_seed(cfg) -> int:
    """The patient split's seed: ``data.split_seed``, or ``seed`` where that is null (central training and
    the benchmark, whose seeds draw population, split and initialisation together)."""
    value = OmegaConf.select(cfg, "data.split_seed")
    return int(cfg.seed if value is None else value)


def _pinned(by_split: dict[str, np.ndarray], path: Path, settings: dict,
            write: bool) -> tuple[dict[str, np.ndarray], str | None]:
    """``by_split`` with every patient the pin file at ``path`` knows in its pinned split (new patients keep
    the fresh split's), and the pin's id. ``write``: create or extend the file (atomically); otherwise a
    missing file leaves the split unpinned. A pin made with other split settings is refused, not mixed."""
    if path.is_file():
        fix = "restore it, or move it away to split afresh (with the site's state, trained on the old split)"
        try:
            pin = json.loads(path.read_text())
            known = {str(p): str(s) for p, s in pin["patients"].items()}
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise StateError(path, f"unreadable pinned patient split ({type(exc).__name__}): {fix}") from exc
        if not isinstance(pin.get("id"), str) or not pin["id"]:
            raise StateError(path, f"pinned patient split without an id: {fix}")
        if unknown := sorted(set(known.values()) - set(by_split)):
            raise StateError(path, f"pinned patient split puts patients in {unknown}, not one of {sorted(by_split)}: {fix}")
        if pin.get("settings") != settings:
            raise ConfigError(path, f"the site's split settings {settings} are not those its split was pinned with "
                                    f"{pin.get('settings')}: keep those, or move this file away to split afresh (with "
                                    "the site's state and model, which trained on the old split)")
    elif write:
        pin, known = {"id": uuid.uuid4().hex, "settings": settings}, {}
    else:
        return by_split, None
    order = np.concatenate([by_split["train"], by_split["val"], by_split["test"]])  # the fresh permutation
    fresh = {str(p): name for name, pats in by_split.items() for p in pats}
    final = {p: known.get(p, name) for p, name in fresh.items()}
    if write and (set(fresh) - set(known) or not path.is_file()):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "w", private=True) as fh:
            fh.write(json.dumps({**pin, "patients": {**known, **final}}, indent=1, sort_keys=True))
    pinned = {name: np.array([p for p in order if final[str(p)] == name], dtype=order.dtype) for name in by_split}
    return pinned, str(pin["id"])


def pin_path(cfg) -> Path:
    """Where the site's pinned split lives: ``SPLIT_FILE`` beside its state."""
    return Path(cfg.site.state_dir) / SPLIT_FILE


def load_site_data(cache_dir: str | Path, cfg, pin: str | Path | None = None, write_pin: bool = False) -> SiteData:
    """Open a site's cache and split its labeled rows by patient; ``pin``: the site's pinned split
    (``SPLIT_FILE``), followed where it exists, created or extended with ``write_pin``."""
    cache = SiteCache.open(cache_dir)
    table = cache.table
    labeled = table["labeled"].astype(bool).to_numpy() & np.isfinite(table["bmd"].to_numpy(dtype=float))
    seed = split_seed(cfg)
    rng = np.random.default_rng([seed, zlib.crc32(cache.site.encode())])
    patients = np.unique(table.loc[labeled, "patient_id"].astype(str).to_numpy())
    by_split, split_id = _split_patients(patients, cfg.data.split, rng), None
    if pin is not None:
        settings = {"split_seed": seed, "split": {k: float(v) for k, v in cfg.data.split.items()}}
        by_split, split_id = _pinned(by_split, Path(pin), settings, write_pin)
    fraction = float(cfg.data.label_fraction)
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(None, f"data.label_fraction={fraction}: must be in (0, 1]")
    train_patients = by_split["train"]
    by_split["train"] = train_patients[: max(1, int(round(fraction * len(train_patients))))] if len(train_patients) else train_patients
    pid = table["patient_id"].astype(str).to_numpy()
    splits = {name: np.flatnonzero(labeled & np.isin(pid, pats)) for name, pats in by_split.items()}
    # Self-supervision uses every crop except those of held-out (val/test) patients, so that no
    # evaluated crop is seen in training, not even without its label.
    held_out = np.isin(pid, np.concatenate([by_split["val"], by_split["test"]]))
    splits["unlabeled"] = np.flatnonzero(~held_out)
    devices = table.loc[labeled, "dxa_manufacturer"].dropna().astype(str)
    if len(devices):
        manufacturer = check_manufacturer(devices.mode().iloc[0])
    else:
        manufacturer = check_manufacturer(OmegaConf.select(cfg, "site.dxa_manufacturer", default="hologic"))
    return SiteData(cache, splits, manufacturer, split_id)


def normalise_hu(crop: np.ndarray) -> np.ndarray:
    return (np.clip(crop.astype(np.float32), *HU_CLIP) - HU_CENTER) / HU_SCALE


class CropDataset(Dataset):
    """Rows of a site cache as tensors: ``x`` (2, S, S, S) = normalised HU + mask, raw radiomic
    ``features``, and targets (NaN/-1 where a row has no label).

    ``device``: the site's DXA manufacturer, whose BMD the calibration head predicts. A row measured on
    another device (a site that replaced its scanner, or sees outside exams) keeps its sBMD and category
    targets but has no device-BMD target: its BMD is on another scale.
    """

    def __init__(self, cache: SiteCache, rows: np.ndarray, augment: bool = False, seed: int = 0,
                 device: str | None = None) -> None:
        self.cache, self.rows, self.augment = cache, np.asarray(rows, dtype=np.int64), augment
        self.rng = np.random.default_rng(seed)
        t = cache.table
        self.sbmd = t["sbmd"].to_numpy(dtype=np.float32)
        self.bmd = t["bmd"].to_numpy(dtype=np.float32)
        if device is not None:
            self.bmd[t["dxa_manufacturer"].astype(str).to_numpy() != device] = np.nan
        self.category = t["category"].fillna(-1).to_numpy(dtype=np.int64)
        self.level = t["level_idx"].to_numpy(dtype=np.int64)
        self.sex = sex_codes(t["sex"])

    def __len__(self) -> int:
        return len(self.rows)

    def _augment(self, x: np.ndarray) -> np.ndarray:
        """Flips and 90-degree rotations in the axial (y, x) plane and a small intensity jitter."""
        rng = self.rng
        x = np.rot90(x, k=int(rng.integers(4)), axes=(2, 3))
        if rng.random() < 0.5:
            x = x[:, :, ::-1, :]
        if rng.random() < 0.5:
            x = x[:, :, :, ::-1]
        x = np.ascontiguousarray(x)
        x[0] = x[0] * (1 + rng.uniform(-JITTER_SCALE, JITTER_SCALE)) + rng.uniform(-JITTER_SHIFT, JITTER_SHIFT)
        return x

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = int(self.rows[i])
        x = np.stack([normalise_hu(self.cache.crops[r]), self.cache.masks[r].astype(np.float32) / MASK_SCALE])
        if self.augment:
            x = self._augment(x)
        return {
            "x": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            "features": torch.from_numpy(np.array(self.cache.features[r], dtype=np.float32)),
            "sbmd": torch.tensor(self.sbmd[r]),
            "bmd": torch.tensor(self.bmd[r]),
            "category": torch.tensor(self.category[r]),
            "level": torch.tensor(self.level[r]),
            "sex": torch.tensor(self.sex[r]),
            "row": torch.tensor(r),
        }


class OneRowPerPatient(Dataset):
    """DP-SGD's record is the patient: item ``i`` is one vertebra of the ``i``-th patient among ``rows``,
    drawn afresh at every access. Poisson sampling over this dataset takes each patient with probability
    q and lets it add one clipped gradient, which is the mechanism Opacus's accountant counts, so the ε it
    reports bounds what a step reveals about a patient. Over ``rows`` themselves a patient with four
    vertebrae would be four records, and its ε that of a group of four (group privacy; ε ≥ 4× here)."""

    def __init__(self, rows: CropDataset, seed: int = 0) -> None:
        patients = rows.cache.table["patient_id"].to_numpy(dtype=object)[rows.rows]
        _, inverse, counts = np.unique(patients.astype(str), return_inverse=True, return_counts=True)
        self.rows, self.rng = rows, np.random.default_rng(seed)
        self.patients = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[int(self.rng.choice(self.patients[i]))]
