"""What preparation could not use, and why: one record per case, written as the site's quarantine.csv."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable

import pandas as pd

from osteo_model.atomic import atomic_file

QUARANTINED = "quarantined"          # the whole study or DXA row is left out
LEVEL_EXCLUDED = "level_excluded"    # one vertebra left out, the study's other levels kept
VALUE_DROPPED = "value_dropped"      # one DXA value left out, the rest of the row kept
UNLABELED = "unlabeled"              # study kept for self-supervision, without DXA labels
UNPAIRED = "unpaired"                # DXA row that labels nothing: no study has its patient_id


@dataclass(frozen=True)
class Problem:
    case: str        # study_id, or "dxa.csv line N"
    file: str        # the file at fault, relative to the site folder where possible
    reason: str
    level: str = ""
    action: str = QUARANTINED


COLUMNS = tuple(f.name for f in fields(Problem))


def write_quarantine_csv(path: Path, problems: Iterable[Problem]) -> Path:
    """Write the report atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as fh:
        pd.DataFrame([asdict(p) for p in problems], columns=list(COLUMNS)).to_csv(fh, index=False)
    return path
