"""A site's DXA table: validation, CT<->DXA pairing and per-level labels.

Bad rows are reported as ``Problem``s and left out; the rest of the table is kept. Bone-density
arithmetic (sBMD, T-score, category) comes from ``osteo_model.bmd``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from osteo_model import bmd
from osteo_model.constants import (
    AGE_MISMATCH_TOLERANCE_YEARS,
    AGE_PLAUSIBLE_RANGE,
    BMD_PLAUSIBLE_RANGE,
    LEVELS,
    T_SCORE_MISMATCH_TOLERANCE,
    T_SCORE_PLAUSIBLE_RANGE,
)
from osteo_model.quarantine import QUARANTINED, UNLABELED, UNPAIRED, VALUE_DROPPED, Problem
from osteo_model.site_tables import EXTRA_FIELDS, read_site_table

BMD_COLUMNS = {level: f"bmd_{level.lower()}" for level in LEVELS}
T_COLUMNS = {level: f"t_{level.lower()}" for level in LEVELS}
REQUIRED_COLUMNS = ("patient_id", "dxa_date", "manufacturer", "model", *BMD_COLUMNS.values())
NUMBER = re.compile(r"[+-]?(\d+([.,]\d*)?|[.,]\d+)([eE][+-]?\d+)?")  # one decimal point or comma
SEXES = {"female": "female", "f": "female", "w": "female", "male": "male", "m": "male"}


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame(columns=["line", *REQUIRED_COLUMNS, *T_COLUMNS.values(), "sex", "age"])


def read_dxa(path: Path, bmd_range: tuple[float, float] = BMD_PLAUSIBLE_RANGE) -> tuple[pd.DataFrame, list[Problem]]:
    """Read and validate ``dxa.csv``; return the usable rows and the problems found.

    A row is quarantined for an unknown device, an unreadable or future date, no usable BMD at any level,
    more values than columns, or a duplicate key (patient_id + the date it gives, however written: which of
    the rows is right cannot be told); so are all rows of a patient_id that disagree on who the patient is
    (:func:`_shared_ids`). A single unreadable or implausible BMD, T-score or age, or an unknown sex code, is
    dropped (reported) and the row's other values kept (:func:`_levels`, :func:`_demographics`). No file
    means no labels, reported as such. Export dialects: ``osteo_model.site_tables``.
    """
    if not path.is_file():
        return _empty_table(), [Problem(path.name, path.name, "DXA table not found: every study is unlabeled", action=UNLABELED)]
    raw, bad_lines = read_site_table(path, REQUIRED_COLUMNS, "DXA table")
    problems: list[Problem] = []

    def report(line: int, reason: str, level: str = "", action: str = QUARANTINED) -> None:
        problems.append(Problem(f"{path.name} line {line}", path.name, reason, level, action))

    for line, reason in bad_lines.items():
        report(line, reason)
    dates = pd.to_datetime(raw["dxa_date"], format="%Y-%m-%d", errors="coerce")
    key = raw["patient_id"] + "|" + dates.dt.strftime("%Y-%m-%d")  # "2020-11-5" is "2020-11-05"; NaN: no date
    duplicated = key.duplicated(keep=False) & key.notna()
    today = pd.Timestamp.today().normalize()
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
        date = dates[i]
        if pd.isna(date) or not r["patient_id"]:
            report(line, "missing patient_id or dxa_date not YYYY-MM-DD")
            continue
        if date > today:
            report(line, f"dxa_date {r['dxa_date']} is in the future")
            continue
        dropped: list[str] = []  # numbers that cannot be used: what a stray delimiter leaves behind

        def drop(reason: str, level: str = "", number: bool = True) -> None:
            if number:
                dropped.append(reason)
            report(line, reason, level, VALUE_DROPPED)

        values, unusable = _levels(r, manufacturer, bmd_range, drop)
        if not unusable:
            values.update(_demographics(r, drop))
        if dropped and r[EXTRA_FIELDS] and not unusable:
            unusable = (f"{r[EXTRA_FIELDS]} empty field(s) past the last column and a number it cannot use "
                        f"({dropped[0]}): a stray delimiter, as in a decimal comma, would shift every value after it")
        if unusable:
            report(line, unusable)
            continue
        rows.append({"line": line, "patient_id": r["patient_id"], "dxa_date": date, "manufacturer": manufacturer,
                     "model": r["model"], **values})
    table = pd.DataFrame(rows, columns=_empty_table().columns) if rows else _empty_table()
    shared = _shared_ids(table)
    for i, reason in shared.items():
        report(int(table.at[i, "line"]), reason)
    return table.drop(index=list(shared)).reset_index(drop=True), problems


def _levels(r: pd.Series, manufacturer: str, bmd_range: tuple[float, float],
            drop: Callable[[str, str], None]) -> tuple[dict[str, float], str]:
    """A row's BMD and given T-score per level, and why the whole row is unusable ("" if it is usable).

    An unreadable or implausible BMD or T-score is dropped through ``drop`` and the level's other value kept.
    A negative BMD (a T-score in a BMD column) or a given T-score that contradicts its BMD (on the level's
    reference, as a printout gives it) quarantines the row instead of using the computed T-score: which of the
    two values is wrong, and whether the row's other columns are shifted too, cannot be told, and a wrong BMD
    is a wrong training target.
    """
    bmds = {level: _cell(r, BMD_COLUMNS[level], drop, level) for level in LEVELS}
    negative = [level for level, value in bmds.items() if value < 0]
    if negative:
        return {}, f"negative BMD at {', '.join(negative)}: T-scores in the BMD columns?"
    values: dict[str, float] = {}
    mismatched = []
    lo, hi = T_SCORE_PLAUSIBLE_RANGE
    sex = _sex(r)
    for level, value in bmds.items():
        t = _cell(r, T_COLUMNS[level], drop, level)
        if not math.isnan(value) and not bmd_range[0] <= value <= bmd_range[1]:
            drop(f"implausible BMD {value} g/cm2 (plausible {bmd_range[0]}-{bmd_range[1]})", level)
            value = math.nan
        if not math.isnan(t) and not lo <= t <= hi:
            drop(f"implausible T-score {t} (plausible {lo:g} to {hi:g})", level)
            t = math.nan
        computed = bmd.region_t_score(value, [level], manufacturer, sex)
        if abs(t - computed) > T_SCORE_MISMATCH_TOLERANCE:  # False where either is missing (NaN)
            mismatched.append(f"{level} T {t:g} given, BMD {value:g} is T {computed:.1f}")
        values[BMD_COLUMNS[level]], values[T_COLUMNS[level]] = value, t
    if all(math.isnan(values[BMD_COLUMNS[level]]) for level in LEVELS):
        return values, "no usable BMD at any level (missing, unreadable or implausible)"
    if mismatched:
        return values, (f"T-score does not match BMD on the {manufacturer} young-adult reference of its level "
                        f"({'; '.join(mismatched)}; tolerance {T_SCORE_MISMATCH_TOLERANCE:g}): columns swapped or shifted?")
    return values, ""


def _sex(r: pd.Series) -> str:
    """A row's sex as "female", "male" or "" (missing or unknown code)."""
    return SEXES.get(str(r.get("sex", "")).lower(), "")


def _demographics(r: pd.Series, drop: Callable[..., None]) -> dict[str, Any]:
    """A row's sex and age; an unknown sex code or an unreadable or implausible age is dropped through
    ``drop`` (sex picks the T-score reference in osteo-predict: none, both sexes averaged, is better than a
    guess)."""
    code = str(r.get("sex", ""))
    sex = _sex(r)
    if code and not sex:
        drop(f"unknown sex {code!r} (expected female/f/w or male/m)", number=False)
    age, (lo, hi) = _cell(r, "age", drop), AGE_PLAUSIBLE_RANGE
    if not math.isnan(age) and not lo <= age <= hi:
        drop(f"implausible age {age:g} (plausible {lo:g}-{hi:g})")
        age = math.nan
    return {"sex": sex, "age": age}


def _shared_ids(table: pd.DataFrame) -> dict[int, str]:
    """Rows (by index) of each patient_id whose rows disagree on sex, or on the birth year that age and
    dxa_date imply: two people under one id (a reused or mistyped pseudonym). Which exam is whose, and so
    which CT they label, cannot be told, so all of that id's rows go."""
    shared: dict[int, str] = {}
    for _, rows in table.groupby("patient_id"):
        sexes = sorted(set(rows["sex"]) - {""})
        born = rows["dxa_date"].dt.year + rows["dxa_date"].dt.day_of_year / 365.25 - rows["age"].astype(float)
        if len(sexes) > 1:
            conflict = f"sex ({' vs '.join(sexes)})"
        elif born.max() - born.min() > AGE_MISMATCH_TOLERANCE_YEARS:  # rows without an age are skipped
            conflict = f"the birth year that age and dxa_date imply ({born.min():.0f} vs {born.max():.0f})"
        else:
            continue
        lines = ", ".join(map(str, rows["line"]))
        shared.update({i: f"patient_id shared by different people? its rows (lines {lines}) disagree on {conflict}"
                       for i in rows.index})
    return shared


def _cell(r: pd.Series, column: str, drop: Callable[..., None], level: str = "") -> float:
    """The number in a row's cell; NaN for an empty cell or an absent column (not measured). A cell that is
    not a number ("0.9O1", "<0.5", "85%", "NaN") is dropped through ``drop``: it is a typo, a unit or a
    qualifier, not a measurement, and must not pass for a level the report left out."""
    text = str(r.get(column, ""))
    try:
        return _number(text)
    except ValueError:
        drop(f"unreadable {column} {text!r} (not a number)", level)
        return math.nan


def _number(text: str) -> float:
    """A number as exports write it, the decimal comma of a European spreadsheet included; NaN for an empty
    cell, ValueError for any other text (a thousands separator, NaN and inf included)."""
    text = text.strip()
    if not text:
        return math.nan
    if not NUMBER.fullmatch(text):
        raise ValueError(f"not a number: {text!r}")
    return float(text.replace(",", "."))


@dataclass(frozen=True)
class Pairing:
    """A study's DXA exam (a row of the validated table as a dict) and its distance from the CT."""

    dxa: dict[str, Any] | None
    interval_days: int | None


def pair_studies(studies: pd.DataFrame, dxa: pd.DataFrame, max_days: int, dxa_file: str,
                 studies_file: str) -> tuple[dict[str, Pairing], list[Problem]]:
    """Pair each study with its patient's nearest DXA exam within ``max_days`` of the CT.

    A patient whose nearest exam is farther keeps the study unlabeled and the gap is reported; so is each
    DXA row whose patient_id no study has (:func:`_unpaired`), since ids changed by a spreadsheet would
    otherwise leave a whole site unlabeled without a word.
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
    return pairings, problems + _unpaired(dxa, studies["patient_id"], dxa_file, studies_file)


def _unpaired(dxa: pd.DataFrame, patient_ids: Iterable[str], dxa_file: str, studies_file: str) -> list[Problem]:
    """One problem per DXA row whose patient_id no study has, naming the study id it equals up to letter case,
    leading zeros and a trailing '.0' where there is one (what a spreadsheet changes: '00003' read as the number
    3, written back as 3.0)."""
    known = set(patient_ids)
    loose = {_loose_id(pid): pid for pid in known}
    problems = []
    for r in dxa[~dxa["patient_id"].isin(known)].itertuples():
        near = loose.get(_loose_id(r.patient_id))
        hint = f" (a study has {near!r}: letter case, leading zeros or '.0' changed by a spreadsheet?)" if near else ""
        reason = f"patient_id {r.patient_id!r} matches no usable study in {studies_file}{hint}"
        problems.append(Problem(f"{dxa_file} line {r.line}", dxa_file, reason, action=UNPAIRED))
    return problems


def _loose_id(patient_id: str) -> str:
    """An id without letter case, without the zeros leading a run of digits ('P00005' -> 'p5') and without the
    '.0' a spreadsheet gives a number it read ('7.0' -> '7')."""
    return re.sub(r"(?<!\d)0+(?=\d)", "", re.sub(r"(?<=\d)\.0+$", "", patient_id.casefold()))


def level_labels(dxa_row: dict[str, Any] | None, level: str) -> dict[str, float | int]:
    """bmd, sbmd, t_score and WHO category of one level; NaN/-1 without a DXA row or BMD there.

    The T-score is always the BMD's on its level's young-adult reference (bmd.region_t_score, by sex where
    known), the one a DXA printout gives each vertebra. A T-score the report gives only checks the row
    (:func:`read_dxa`): labels must not mean one thing at a site whose export has T columns and another
    at one without, and a printed T is rounded and on the vendor's own database version.
    """
    value = math.nan if dxa_row is None else float(dxa_row[BMD_COLUMNS[level]])
    if math.isnan(value):
        return {"bmd": math.nan, "sbmd": math.nan, "t_score": math.nan, "category": -1}
    manufacturer = dxa_row["manufacturer"]
    t = bmd.region_t_score(value, [level], manufacturer, str(dxa_row.get("sex", "")))
    return {"bmd": value, "sbmd": float(bmd.to_sbmd(value, manufacturer)), "t_score": t, "category": int(bmd.category_from_t(t))}


def dominant_manufacturer(dxa: pd.DataFrame, default: str) -> str:
    """The site's most common DXA manufacturer (its device expert); ``default`` with no DXA rows."""
    if not len(dxa):
        return default
    counts = dxa["manufacturer"].value_counts()
    return str(min(counts.index, key=lambda name: (-counts[name], name)))  # ties: alphabetical, deterministic
