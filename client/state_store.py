"""The site's own federated state on disk: what must survive rounds, runs and restarts but never leaves.

Flower's ``context.state`` lives only as long as one run, and in a deployment every message starts a
fresh ClientApp process, so the local expert, the DXA-calibration head, the optimiser state and the
privacy accountant are kept in ``<state_dir>/site_state.pt``. Writes are atomic (temporary file, fsync,
rename) and the previous revision is kept as ``site_state.prev.pt``. A file that cannot be read, belongs
to another site or has another format version raises :class:`StateError`: silently starting a fresh
local expert would throw away what the site learned and, worse, reset its privacy spending.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from osteo_model.atomic import atomic_file
from osteo_model.errors import StateError

FORMAT_VERSION = 1
STATE_FILE = "site_state.pt"
PREVIOUS_FILE = "site_state.prev.pt"


@dataclass
class SiteState:
    """Everything a site keeps between rounds. ``revision`` counts saves (1 = first save)."""

    site: str
    local: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    accountant: dict[str, Any] | None = None
    epsilon: float = 0.0
    rounds_trained: int = 0
    rounds_by_run: dict[str, int] = field(default_factory=dict)  # train rounds per run id (site.policy.compute.max_rounds)
    run_names: dict[str, str] = field(default_factory=dict)  # Flower run id -> the run id its coordinator declared
    evaluations_by_run: dict[str, int] = field(default_factory=dict)  # evaluations answered per run id (max_evaluations)
    non_private_rounds: int = 0  # train rounds without DP behind the local parts and optimiser (DP starts them afresh)
    shuffle_salt: str | None = None  # the site's secret in its batch order (SiteSession.open); None: the run's seed alone
    revision: int = 0


class StateStore:
    """Load and save one site's :class:`SiteState` in ``state_dir``."""

    def __init__(self, state_dir: str | Path, site: str) -> None:
        self.dir = Path(state_dir)
        self.site = site

    @property
    def path(self) -> Path:
        return self.dir / STATE_FILE

    def load(self) -> SiteState:
        """The saved state, or a fresh one when the site has never trained (no file at all)."""
        if not self.path.exists():
            if (self.dir / PREVIOUS_FILE).exists():
                raise StateError(self.path, f"missing while {PREVIOUS_FILE} exists: restore it or move both away")
            return SiteState(site=self.site)
        try:
            raw = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for truncated/garbled files
            raise StateError(
                self.path,
                f"unreadable site state ({type(exc).__name__}); restore {PREVIOUS_FILE} or move the file "
                "away to start this site afresh (its privacy spending would be lost)",
            ) from exc
        if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
            version = raw.get("format_version") if isinstance(raw, dict) else None
            raise StateError(self.path, f"site state format {version!r} is not {FORMAT_VERSION}")
        if raw.get("site") != self.site:
            raise StateError(self.path, f"state belongs to site {raw.get('site')!r}, not {self.site!r}")
        return SiteState(
            site=raw["site"],
            local=dict(raw["local"]),
            optimizer=raw.get("optimizer"),
            accountant=raw.get("accountant"),
            epsilon=float(raw["epsilon"]),
            rounds_trained=int(raw["rounds_trained"]),
            rounds_by_run={str(k): int(v) for k, v in (raw.get("rounds_by_run") or {}).items()},
            run_names={str(k): str(v) for k, v in (raw.get("run_names") or {}).items()},
            evaluations_by_run={str(k): int(v) for k, v in (raw.get("evaluations_by_run") or {}).items()},
            # a state saved before this field: every round without an accountant counts as one without DP
            non_private_rounds=int(raw.get("non_private_rounds", 0 if raw.get("accountant") else raw["rounds_trained"])),
            shuffle_salt=raw.get("shuffle_salt"),
            revision=int(raw["revision"]),
        )

    def save(self, state: SiteState, keep_previous: bool = True) -> SiteState:
        """Write ``state`` as the next revision, atomically and readable by the site's owner only (as its
        split pin and audit log): the local parts hold what its patients taught them, the standardisation
        its feature moments; return what was written. ``keep_previous``: copy the current file to
        ``site_state.prev.pt`` first. A save that trains nothing (a run's name, an evaluation counted) keeps
        the backup as it is: otherwise one evaluation after a ruinous round would copy the ruined local parts
        over the last good ones."""
        self.dir.mkdir(parents=True, exist_ok=True)
        state.revision += 1
        payload = {
            "format_version": FORMAT_VERSION,
            "site": state.site,
            "local": {k: v.detach().cpu().clone() for k, v in state.local.items()},
            "optimizer": state.optimizer,
            "accountant": state.accountant,
            "epsilon": float(state.epsilon),
            "rounds_trained": int(state.rounds_trained),
            "rounds_by_run": dict(state.rounds_by_run),
            "run_names": dict(state.run_names),
            "evaluations_by_run": dict(state.evaluations_by_run),
            "non_private_rounds": int(state.non_private_rounds),
            "shuffle_salt": state.shuffle_salt,
            "revision": state.revision,
        }
        if keep_previous and self.path.exists():  # keep the previous revision; the current file is never absent
            with atomic_file(self.dir / PREVIOUS_FILE, private=True) as fh, open(self.path, "rb") as src:
                shutil.copyfileobj(src, fh)
        with atomic_file(self.path, private=True) as fh:
            torch.save(payload, fh)
        return state
