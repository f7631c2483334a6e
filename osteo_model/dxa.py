"""A site's DXA table: validation, CT<->DXA pairing and per-level labels.

Bad rows are reported as ``Problem``s and left out; the rest of the table is kept. Bone-density
arithmetic (sBMD, T-score, category) comes from ``osteo_model.bmd``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from osteo_model import bmd
from osteo_model.constants import BMD_PLAUSIBLE_RANGE, LEVELS
from osteo_model.quarantine import QUARANTINED, UNLABELED, VALUE_DROPPED, Problem
from osteo_model.site_tables import read_site_table

BMD_COLUMNS = {level: f"bmd_{level.lower()}" for level in LEVELS}
T_COLUMNS = {level: f"t_{level.lower()}" for level in LEVELS}
REQUIRED_COLUMNS = ("patient_id", "dxa_date", "manufacturer", "model", *BMD_COLUMNS.values())
SEXES = {"female": "female", "f": "female", "w": "female", "male": "male", "m": "male"}


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame(columns=["line", *REQUIRED_COLUMNS, *T_COLUMNS.values(), "sex", "age"])


def read_dxa(path: Path, bmd_range: tuple[float, float] = BMD_PLAUSIBLE_RANGE) -> tuple[pd.DataFrame, list[Problem]]:
    """Read and validate ``dxa.csv``; return the usable rows and the problems found.

    A row is quarantined for an unknown device, an unreadable date, no usable BMD at any level, more
    values than columns, or a duplicate key (patient_id + dxa_date: which of the rows is right cannot be
    told). A single implausible BMD is dropped (reported) and the row's other levels kept. No file means
    no labels, reported as such. Export dialects: ``osteo_model.site_tables``.
    """
    if not path.is_file():
        return _empty_table(), [Problem(path.name, path.name, "DXA table not found: every study is unlabeled", action=UNLABELED)]
    raw, bad_lines = read_site_table(path, REQUIRED_COLUMNS, "DXA table")
    problems: list[Problem] = []

    def report(line: int, reason: str, level: str = "", action: str = QUARANTINED) -> None:
        problems.append(Problem(f"{path.name} line {line}", path.name, reason, level, action))

    for line, reason in bad_lines.items():
        report(line, reason)
    key = raw["patient_id"] + "|" + raw["dxa_date"]
    duplicated = key.duplicated(keep=False)
    rows = []
    for i, r in raw.iterrows():
        line = int(r["line"])
        if duplicated[i]:
            others = raw.loc[(key == key[i]) & (raw.index != i), "line"].tolist()
            report(line, f"duplicate key patient_id+dxa_date (also on line {', '.join(map(str, others))})")
            continue
        manufacturer = bmd.normalise_manufacturer(r["manufacturer"])
        if manufacturer is None:
            report(line, f"unknown DXA device manufacturer {r['manufacturer']!r} (no sBMD equation for it)")
            continue
        date = pd.to_datetime(r["dxa_date"], format="%Y-%m-%d", errors="coerce")
        if pd.isna(date) or not r["patient_id"]:
            report(line, "missing patient_id or dxa_date not YYYY-MM-DD")
            continue
        row: dict[str, Any] = {"line": line, "patient_id": r["patient_id"], "dxa_date": date,
                               "manufacturer": manufacturer, "model": r["model"]}
        for level in LEVELS:
            value = _number(r[BMD_COLUMNS[level]])
            if not math.isnan(value) and not bmd_range[0] <= value <= bmd_range[1]:
                report(line, f"implausible BMD {value} g/cm2 (plausible {bmd_range[0]}-{bmd_range[1]})", level, VALUE_DROPPED)
                value = float("nan")
            row[BMD_COLUMNS[level]] = value
            row[T_COLUMNS[level]] = _number(r.get(T_COLUMNS[level], ""))
        if all(math.isnan(row[BMD_COLUMNS[lv]]) for lv in LEVELS):
            report(line, "no usable BMD at any level (missing or implausible)")
            continue
        row["sex"] = SEXES.get(str(r.get("sex", "")).lower(), "")
        row["age"] = _number(r.get("age", ""))
        rows.append(row)
    table = pd.DataFrame(rows, columns=_empty_table().columns) if rows else _empty_table()
    return table, problems


def _number(text: Any) -> float:
    """A number as exports write it, the decimal comma of a European spreadsheet included; NaN if none."""
    try:
        value = float(str(text).strip().replace(",", "."))
    except ValueError:
        return float("nan")
    return value if math.isfinite(value) else float("nan")


@dataclass(frozen=True)
class Pairing:
    """A study's DXA exam (a row of the validated table as a dict) and its distance from the CT."""

    dxa: dict[str, Any] | None
    interval_days: int | None


def pair_studies(studies: pd.DataFrame, dxa: pd.DataFrame, max_days: int, dxa_file: str) -> tuple[dict[str, Pairing], list[Problem]]:
    """Pair each study with its patient's nearest DXA exam within ``max_days`` of the CT.

    A patient whose nearest exam is farther keeps the study unlabeled and the gap is reported.
    """
    pairings: dict[str, Pairing] = {}
    problems: list[Problem] = []
    by_patient = {pid: g for pid, g in dxa.groupby("patient_id")} if len(dxa) else {}
    for s in studies.itertuples():
        exams = by_patient.get(s.patient_id)
        if exams is None:
            pairings[s.study_id] = Pairing(None, None)
            continue
        intervals = (exams["dxa_date"] - s.ct_date).dt.days.to_numpy()
        best = int(np.argmin(np.abs(intervals)))  # first of ties: the table's order decides
        if abs(intervals[best]) > max_days:
            pairings[s.study_id] = Pairing(None, None)
            problems.append(Problem(
                s.study_id, dxa_file,
                f"nearest DXA is {abs(int(intervals[best]))} days from the CT (limit {max_days}): study kept unlabeled",
                action=UNLABELED,
            ))
            continue
        pairings[s.study_id] = Pairing(exams.iloc[best].to_dict(), int(intervals[best]))
    return pairings, problems


def level_labels(dxa_row: dict[str, Any] | None, level: str) -> dict[str, float | int]:
    """bmd, sbmd, t_score and WHO category of one level; NaN/-1 without a DXA row or BMD there.

    A T-score the DXA report gives is used as is (the device's own reference); otherwise it is
    computed on the manufacturer's young-adult reference.
    """
    value = math.nan if dxa_row is None else float(dxa_row[BMD_COLUMNS[level]])
    if math.isnan(value):
        return {"bmd": math.nan, "sbmd": math.nan, "t_score": math.nan, "category": -1}
    manufacturer = dxa_row["manufacturer"]
    given_t = float(dxa_row.get(T_COLUMNS[level], math.nan))
    t = given_t if not math.isnan(given_t) else float(bmd.t_score(value, manufacturer))
    return {"bmd": value, "sbmd": float(bmd.to_sbmd(value, manufacturer)), "t_score": t, "category": int(bmd.category_from_t(t))}


def dominant_manufacturer(dxa: pd.DataFrame, default: str) -> str:
    """The site's most common DXA manufacturer (its device expert); ``default`` with no DXA rows."""
    if not len(dxa):
        return default
    counts = dxa["manufacturer"].value_counts()
    return str(min(counts.index, key=lambda name: (-counts[name], name)))  # ties: alphabetical, deterministic
