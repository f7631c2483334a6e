"""A site's CSV tables (studies.csv, dxa.csv) as hospital exports write them.

Spreadsheet exports differ from the README's example in ways that must not block a site or shift
values into the wrong column: a European Excel writes ``;`` with decimal commas (and cp1252 text), a
header may carry capitals, spaces or a byte-order mark, blank rows come as ``;;;;``, and a trailing
delimiter adds an empty last field to every line.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

import pandas as pd

from osteo_model.errors import InputError

DELIMITERS = (",", ";", "\t", "|")
# How many empty fields a row had past the header's: taken as an export's trailing delimiters where no row
# ends where the header does, which a lone stray delimiter before an empty last cell looks like too.
EXTRA_FIELDS = "extra_fields"


def _text(path: Path, what: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"unreadable {what} ({exc.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")  # Excel's "CSV" on Windows


def read_site_table(path: Path, required: Sequence[str], what: str) -> tuple[pd.DataFrame, dict[int, str]]:
    """The table as whitespace-trimmed strings plus a ``line`` column (the line a spreadsheet shows) and an
    :data:`EXTRA_FIELDS` column, and the lines left out with why.

    The delimiter is the one the header line uses most; column names are trimmed and lower-cased. Blank
    rows are skipped without a word; a row with more values than the header has columns is left out
    (which value belongs where cannot be told). Empty trailing fields are not values only where they are
    a trailing delimiter (:func:`_row_width`): an unquoted decimal comma before an empty last cell adds one
    too, and would shift every value after it. Where no row ends where the header does, one row alone cannot
    tell the two apart: its :data:`EXTRA_FIELDS` lets a reader that finds a number it cannot use leave out the
    whole row (``dxa.read_dxa``).
    """
    text = _text(path, what)
    header_line = text.split("\n", 1)[0]
    delimiter = max(DELIMITERS, key=header_line.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        names = [name.strip().lower() for name in next(reader, [])]
        records = [(reader.line_num, [value.strip() for value in fields]) for fields in reader]
    except csv.Error as exc:
        raise InputError(path, f"unreadable {what} (line {reader.line_num}: {exc})") from None
    header = list(names)
    while header and not header[-1]:
        header.pop()
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise InputError(path, f"{what} has column(s) {twice} more than once")
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(path, f"{what} lacks columns {missing} (found {header}, delimiter {delimiter!r})")
    records = [(line, values) for line, values in records if any(values)]
    width = _row_width(len(names), [values for _, values in records])
    rows, bad = [], {}
    for line, values in records:
        if len(values) > width or any(values[len(header):]):
            bad[line] = (f"{len(values)} values for {len(header)} columns "
                         f"(a stray {delimiter!r} would shift every value after it)")
            continue
        extra = max(0, len(values) - len(names))
        rows.append([line, extra, *values[: len(header)], *[""] * (len(header) - len(values))])
    return pd.DataFrame(rows, columns=["line", EXTRA_FIELDS, *header]), bad


def _row_width(header_fields: int, rows: Sequence[Sequence[str]]) -> int | float:
    """How many fields a row may have, empty ones past the header's columns included.

    Where a row ends where the header does, the export writes no delimiter of its own at line ends (a
    header's own trailing delimiters count as its fields): a longer row holds a stray delimiter. Where none
    does, every line ends with delimiters the export added, and empty trailing fields are not values.
    """
    return header_fields if any(len(values) == header_fields for values in rows) else math.inf
