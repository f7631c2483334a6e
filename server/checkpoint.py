"""Per-round server checkpoints: shared weights, round, phase, strategy state and metrics history.

One ``round-NNNN.npz`` per round in ``<outputs>/<run>/checkpoints/``, each written to a temporary file,
fsync'ed and renamed, so a crash leaves the previous checkpoint intact and never a half-written one.
Only numeric arrays and one JSON string are stored: loading needs no pickle. Flower's strategies have
no start-round argument; :mod:`server_app` resumes by carrying on its own round loop from ``round + 1``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from osteo_model.atomic import atomic_file
from osteo_model.errors import StateError

FORMAT_VERSION = 1
_NAME = re.compile(r"^round-(\d{4,})\.npz$")
_META = "__meta__"
_ARRAYS = "arrays/"
_STRATEGY = "strategy/"


@dataclass
class Checkpoint:
    round: int                                   # last completed round (global, 1-based)
    phase: str                                   # phase of that round: "ssl" | "task"
    arrays: dict[str, np.ndarray]                # global shared arrays after that round
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # strategy name, history, config summary


def checkpoint_path(folder: str | Path, rnd: int) -> Path:
    return Path(folder) / f"round-{rnd:04d}.npz"


def save_checkpoint(folder: str | Path, ckpt: Checkpoint, keep: int = 3) -> Path:
    """Write ``ckpt`` atomically; prune all but the ``keep`` most recent rounds."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**ckpt.meta, "format_version": FORMAT_VERSION, "round": ckpt.round, "phase": ckpt.phase}
    entries: dict[str, np.ndarray] = {_META: np.array(json.dumps(meta, allow_nan=True))}
    entries.update({_ARRAYS + k: np.asarray(v) for k, v in ckpt.arrays.items()})
    entries.update({_STRATEGY + k: np.asarray(v) for k, v in ckpt.strategy_state.items()})
    final = checkpoint_path(folder, ckpt.round)
    with atomic_file(final) as fh:
        np.savez(fh, **entries)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files in round order (oldest first)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data[_META]))
            arrays = {k[len(_ARRAYS):]: data[k] for k in data.files if k.startswith(_ARRAYS)}
            strategy = {k[len(_STRATEGY):]: data[k] for k in data.files if k.startswith(_STRATEGY)}
    except Exception as exc:  # zipfile/numpy/json raise many types for a damaged file
        raise StateError(path, f"unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise StateError(path, f"checkpoint format {meta.get('format_version')!r} is not {FORMAT_VERSION}")
    if not arrays:
        raise StateError(path, "checkpoint holds no arrays")
    return Checkpoint(int(meta["round"]), str(meta["phase"]), arrays, strategy, meta)


def load_latest(folder: str | Path) -> Checkpoint | None:
    """The most recent checkpoint, or None when there is none; a damaged one is a StateError."""
    files = list_checkpoints(folder)
    return load_checkpoint(files[-1]) if files else None
