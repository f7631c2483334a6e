"""Per-round server checkpoints: shared weights, round, phase, strategy state and metrics history.

One ``round-NNNN.npz`` per round in ``<outputs>/<run>/checkpoints/``, written atomically, so a crash leaves
the previous checkpoint intact and never a half-written one. The file format (numeric arrays and one JSON
string, no pickle) belongs to osteo_model.checkpoints, which also reads it for osteo-eval; the meta
carries what rebuilding the model needs (model config, feature count and hash, crop settings). Flower's
strategies have no start-round argument; :mod:`server_app` resumes by carrying on its own round loop from
``round + 1``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from osteo_model.checkpoints import read_npz, write_npz

_NAME = re.compile(r"^round-(\d{4,})\.npz$")


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
    final = checkpoint_path(folder, ckpt.round)
    write_npz(final, ckpt.arrays, ckpt.strategy_state, {**ckpt.meta, "round": ckpt.round, "phase": ckpt.phase})
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
    """The round's checkpoint for resuming (the file format is osteo_model.checkpoints')."""
    arrays, strategy, meta = read_npz(path)
    return Checkpoint(int(meta["round"]), str(meta["phase"]), arrays, strategy, meta)


def load_latest(folder: str | Path) -> Checkpoint | None:
    """The most recent checkpoint, or None when there is none; a damaged one is a StateError."""
    files = list_checkpoints(folder)
    return load_checkpoint(files[-1]) if files else None
