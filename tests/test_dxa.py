"""DXA table validation, CT<->DXA pairing and per-level labels."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from osteo_model import bmd
from osteo_model.constants import LEVELS
from osteo_model.dxa import dominant_manufacturer, level_labels, pair_studies, read_dxa
from osteo_model.errors import InputError
from osteo_model.quarantine import QUARANTINED, UNLABELED, UNPAIRED, VALUE_DROPPED

HEADER = "patient_id,dxa_date,manufacturer,model,bmd_l1,bmd_l2,bmd_l3,bmd_l4,t_l1,t_l2,t_l3,t_l4,sex,age\n"


def write(tmp_path, *rows: str):
    path = tmp_path / "dxa.csv"
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


def test_valid_rows_are_normalised(tmp_path):
    table, problems = read_dxa(write(
        tmp_path,
        "p1,2024-01-10,GE Lunar,Prodigy,1.0,1.1,,1.2,,,,,F,61",
        "p2,2024-02-01,HOLOGIC,Horizon,0.8,0.9,0.95,1.0,-2.0,,,,male,70",
    ))
    assert problems == []
    assert list(table["manufacturer"]) == ["ge_lunar", "hologic"]
    assert list(table["sex"]) == ["female", "male"]
    assert math.isnan(table.iloc[0]["bmd_l3"])  # an excluded level stays missing, the row is kept
    assert table.iloc[1]["line"] == 3


def test_bad_rows_are_quarantined_the_rest_kept(tmp_path):
    table, problems = read_dxa(write(
        tmp_path,
        "p1,2024-01-10,Acme Bone,X1,1.0,1.0,1.0,1.0,,,,,F,60",   # unknown device
        "p2,2024-01-10,Hologic,Horizon,,,,,,,,,F,60",            # no BMD at all
        "p3,2024-01-10,Hologic,Horizon,9.5,0.9,0.9,0.9,,,,,F,60",  # absurd L1 only
        "p4,2024-01-10,Hologic,Horizon,950,960,970,980,,,,,F,60",  # absurd everywhere (mg/cm2)
        "p5,2024-01-10,Hologic,Horizon,1.0,1.0,1.0,1.0,,,,,F,60",  # duplicate key ...
        "p5,2024-01-10,Hologic,Horizon,1.1,1.0,1.0,1.0,,,,,F,60",  # ... of this one
        "p6,10/01/2024,Hologic,Horizon,1.0,1.0,1.0,1.0,,,,,F,60",  # bad date
        "p7,2024-01-10,Norland,XR-46,1.0,1.0,1.0,1.0,,,,,M,60",    # fine
    ))
    assert list(table["patient_id"]) == ["p3", "p7"]
    assert math.isnan(table.iloc[0]["bmd_l1"]) and table.iloc[0]["bmd_l2"] == 0.9
    by_line = {(p.case, p.level): p for p in problems}
    assert by_line[("dxa.csv line 2", "")].reason.startswith("unknown DXA device")
    assert "no usable BMD" in by_line[("dxa.csv line 3", "")].reason
    assert by_line[("dxa.csv line 4", "L1")].action == VALUE_DROPPED
    assert "implausible" in by_line[("dxa.csv line 5", "L4")].reason
    assert "no usable BMD" in by_line[("dxa.csv line 5", "")].reason
    assert "duplicate key" in by_line[("dxa.csv line 6", "")].reason and "line 7" in by_line[("dxa.csv line 6", "")].reason
    assert ("dxa.csv line 7", "") in by_line
    assert "YYYY-MM-DD" in by_line[("dxa.csv line 8", "")].reason
    quarantined = {p.case for p in problems if p.action == QUARANTINED}
    assert quarantined == {f"dxa.csv line {n}" for n in (2, 3, 5, 6, 7, 8)}


def test_given_t_scores_are_range_checked_and_must_match_the_bmd(tmp_path):
    """An absurd T-score is dropped and computed from the BMD; one that contradicts its BMD quarantines the row."""
    bmds = "0.7103,0.9075,0.9273,0.8970"  # Hologic, a man's level references: T -2.24, -1.25, -1.16, -1.32
    table, problems = read_dxa(write(
        tmp_path,
        f"p1,2020-11-05,Hologic,H,{bmds},-2.2,-1.3,-1.2,-1.3,M,69",  # as the device prints them
        f"p2,2020-11-05,Hologic,H,{bmds},-2.2,85,-1.2,-40,M,69",     # typos at L2 and L4
        f"p3,2020-11-05,Hologic,H,{bmds},2.0,-1.3,0.9273,-1.3,M,69",  # L1 wrong, L3 holds the BMD
        "p4,2020-11-05,Hologic,H,0.96,,,,0.0,,,,F,40",  # a woman's L1 (T 0.04); 0.8 above it on the L1-L4 reference
    ))
    assert list(table["patient_id"]) == ["p1", "p2", "p4"]
    assert [(p.case, p.level, p.action) for p in problems] == [
        ("dxa.csv line 3", "L2", VALUE_DROPPED), ("dxa.csv line 3", "L4", VALUE_DROPPED), ("dxa.csv line 4", "", QUARANTINED)]
    assert problems[0].reason == "implausible T-score 85.0 (plausible -8 to 8)"
    assert problems[2].reason == ("T-score does not match BMD on the hologic young-adult reference of its level (L1 T 2 "
                                  "given, BMD 0.7103 is T -2.2; L3 T 0.9273 given, BMD 0.9273 is T -1.2; tolerance 1.5): "
                                  "columns swapped or shifted?")
    p2 = table.iloc[1].to_dict()
    assert level_labels(p2, "L1")["t_score"] == pytest.approx(-2.2415, abs=1e-4)  # from the BMD, not the printed -2.2
    assert level_labels(p2, "L2")["t_score"] == pytest.approx(bmd.region_t_score(0.9075, ["L2"], "hologic", "male"))
    assert level_labels(p2, "L4")["category"] == 1  # -1.32 from the BMD, not "osteoporosis" from -40


def test_t_scores_in_the_bmd_columns_quarantine_the_row(tmp_path):
    """A negative "BMD" is a T-score: the row's positive values (0.4, 0.9, 1.3) are T-scores too, not g/cm2."""
    table, problems = read_dxa(write(
        tmp_path,
        "p1,2024-01-10,Hologic,H,-1.2,0.4,0.9,1.3,,,,,F,60",
        "p2,2024-01-10,Hologic,H,0.9,1.0,1.0,1.1,,,,,F,60",
    ))
    assert list(table["patient_id"]) == ["p2"]
    assert [(p.case, p.level, p.action, p.reason) for p in problems] == [
        ("dxa.csv line 2", "", QUARANTINED, "negative BMD at L1: T-scores in the BMD columns?")]


def test_unknown_sex_code_and_implausible_age_are_dropped(tmp_path):
    table, problems = read_dxa(write(
        tmp_path,
        "p1,2024-01-10,Hologic,H,1.0,1.0,1.0,1.0,,,,,2,250",
        "p2,2024-01-10,Hologic,H,1.0,1.0,1.0,1.0,,,,,,",  # not given: nothing to report
    ))
    assert list(table["sex"]) == ["", ""] and table["age"].isna().all()
    assert [(p.case, p.action, p.reason) for p in problems] == [
        ("dxa.csv line 2", VALUE_DROPPED, "unknown sex '2' (expected female/f/w or male/m)"),
        ("dxa.csv line 2", VALUE_DROPPED, "implausible age 250 (plausible 18-110)")]


def test_rows_of_two_people_under_one_patient_id_are_quarantined(tmp_path):
    table, problems = read_dxa(write(
        tmp_path,
        "p1,2019-04-28,Hologic,H,0.7,0.9,,,,,,,female,75",
        "p1,2019-06-01,Hologic,H,0.8,0.9,,,,,,,male,31",
        "p2,2015-03-01,Hologic,H,0.8,0.9,,,,,,,F,60",
        "p2,2016-03-01,Hologic,H,0.8,0.9,,,,,,,F,70",  # a year later, ten years older
        "p3,2015-03-01,Hologic,H,0.8,0.9,,,,,,,F,60",
        "p3,2020-02-01,Hologic,H,0.8,0.9,,,,,,,,65",   # the same woman five years on, sex not given
        "p3,2021-02-28,Hologic,H,0.8,0.9,,,,,,,F,",
    ))
    assert list(table["patient_id"]) == ["p3"] * 3 and list(table["line"]) == [6, 7, 8]
    assert all(p.action == QUARANTINED for p in problems)
    reasons = {p.case: p.reason for p in problems}
    assert list(reasons) == [f"dxa.csv line {n}" for n in (2, 3, 4, 5)]
    assert reasons["dxa.csv line 3"] == "patient_id shared by different people? its rows (lines 2, 3) disagree on sex (female vs male)"
    assert reasons["dxa.csv line 4"] == ("patient_id shared by different people? its rows (lines 4, 5) disagree on the birth "
                                         "year that age and dxa_date imply (1946 vs 1955)")


def test_dxa_date_in_the_future_is_quarantined(tmp_path):
    table, problems = read_dxa(write(tmp_path, "p1,2099-05-11,Hologic,H,1.0,1.0,1.0,1.0,,,,,F,60"))
    assert len(table) == 0
    assert [(p.case, p.reason) for p in problems] == [("dxa.csv line 2", "dxa_date 2099-05-11 is in the future")]


def test_missing_columns_and_absent_file(tmp_path):
    (tmp_path / "dxa.csv").write_text("patient_id,dxa_date\np1,2024-01-01\n")
    with pytest.raises(InputError, match="lacks columns"):
        read_dxa(tmp_path / "dxa.csv")
    table, problems = read_dxa(tmp_path / "none.csv")
    assert len(table) == 0
    assert [(p.case, p.reason, p.action) for p in problems] == [("none.csv", "DXA table not found: every study is unlabeled", UNLABELED)]


def test_pairing_nearest_within_window_else_unlabeled(tmp_path):
    table, _ = read_dxa(write(
        tmp_path,
        "p1,2024-01-01,Hologic,H,1.0,1.0,1.0,1.0,,,,,F,60",
        "p1,2024-06-01,Hologic,H,0.9,0.9,0.9,0.9,,,,,F,60",
        "p2,2023-01-01,Hologic,H,1.0,1.0,1.0,1.0,,,,,F,60",
    ))
    studies = pd.DataFrame({
        "study_id": ["a", "b", "c"], "patient_id": ["p1", "p2", "p3"],
        "ct_date": pd.to_datetime(["2024-05-01", "2024-05-01", "2024-05-01"]),
    })
    pairings, problems = pair_studies(studies, table, max_days=180, dxa_file="dxa.csv", studies_file="studies.csv")
    assert pairings["a"].dxa["bmd_l1"] == 0.9 and pairings["a"].interval_days == 31
    assert pairings["b"].dxa is None and pairings["c"].dxa is None
    assert [(p.case, p.action) for p in problems] == [("b", UNLABELED)]
    assert "486 days" in problems[0].reason and "limit 180" in problems[0].reason


def test_dxa_rows_of_no_study_are_reported_naming_the_id_a_spreadsheet_changed(tmp_path):
    table, _ = read_dxa(write(
        tmp_path,
        "3,2024-01-01,Hologic,H,1.0,1.0,1.0,1.0,,,,,F,60",
        "P5,2024-01-01,Hologic,H,1.0,1.0,1.0,1.0,,,,,F,60",
        "p9,2024-01-01,Hologic,H,1.0,1.0,1.0,1.0,,,,,F,60",
        "00004,2024-01-01,Hologic,H,1.0,1.0,1.0,1.0,,,,,F,60",
        "7.0,2024-01-01,Hologic,H,1.0,1.0,1.0,1.0,,,,,F,60",
    ))
    studies = pd.DataFrame({"study_id": ["a", "b", "c", "d"], "patient_id": ["00003", "p00005", "00004", "007"],
                            "ct_date": pd.to_datetime(["2024-01-10"] * 4)})
    pairings, problems = pair_studies(studies, table, max_days=180, dxa_file="dxa.csv", studies_file="studies.csv")
    assert pairings["a"].dxa is None and pairings["b"].dxa is None and pairings["c"].dxa["line"] == 5
    spreadsheet = "letter case, leading zeros or '.0' changed by a spreadsheet?"
    assert [(p.case, p.file, p.action, p.reason) for p in problems] == [
        ("dxa.csv line 2", "dxa.csv", UNPAIRED, f"patient_id '3' matches no usable study in studies.csv (a study has '00003': {spreadsheet})"),
        ("dxa.csv line 3", "dxa.csv", UNPAIRED, f"patient_id 'P5' matches no usable study in studies.csv (a study has 'p00005': {spreadsheet})"),
        ("dxa.csv line 4", "dxa.csv", UNPAIRED, "patient_id 'p9' matches no usable study in studies.csv"),
        ("dxa.csv line 6", "dxa.csv", UNPAIRED, f"patient_id '7.0' matches no usable study in studies.csv (a study has '007': {spreadsheet})")]


def test_level_labels_are_on_the_level_reference_whether_or_not_the_report_gives_t():
    """A site whose export has T columns and one without label the same BMD alike: on the level's own
    reference, by sex where known, as a DXA printout scores each vertebra (not on the L1-L4 one)."""
    without_t = {"manufacturer": "hologic", "sex": "female", "bmd_l1": 0.75, "bmd_l2": 1.05, "bmd_l3": math.nan,
                 "bmd_l4": 0.9, "t_l1": math.nan, "t_l2": math.nan, "t_l3": math.nan, "t_l4": math.nan}
    with_t = {**without_t, "t_l1": -1.6, "t_l2": -2.5, "t_l4": -1.0}  # L2's printed T off by 2.4: only read_dxa checks it
    for level in LEVELS:
        assert level_labels(with_t, level) == pytest.approx(level_labels(without_t, level), nan_ok=True)
    l1 = level_labels(without_t, "L1")
    assert l1["t_score"] == pytest.approx(-1.6399, abs=1e-4)  # (0.75 - 1.047 * 0.960 / 1.0525) / 0.125
    assert l1["category"] == 1  # osteopenia; on the L1-L4 reference (0.75 - 1.047) / 0.110 = -2.7 would be osteoporosis
    assert bmd.category_from_t(bmd.t_score(0.75, "hologic")) == 2
    assert l1["sbmd"] == pytest.approx(1.0550 * (0.75 - 0.972) + 1.0436)
    assert level_labels({**without_t, "sex": ""}, "L1")["t_score"] == pytest.approx(-1.7819, abs=1e-4)  # both sexes' L1
    assert level_labels(without_t, "L2")["category"] == 0
    assert level_labels(without_t, "L3")["category"] == -1 and math.isnan(level_labels(without_t, "L3")["bmd"])
    assert level_labels(None, "L1")["category"] == -1


def test_dominant_manufacturer(tmp_path):
    table, _ = read_dxa(write(
        tmp_path,
        "p1,2024-01-01,Lunar,P,1.0,1.0,1.0,1.0,,,,,F,60",
        "p2,2024-01-01,Hologic,H,1.0,1.0,1.0,1.0,,,,,F,60",
        "p3,2024-01-01,GE,P,1.0,1.0,1.0,1.0,,,,,F,60",
    ))
    assert dominant_manufacturer(table, "hologic") == "ge_lunar"
    assert dominant_manufacturer(table.iloc[:0], "norland") == "norland"


def test_a_stray_decimal_comma_before_an_empty_last_cell_quarantines_the_row(tmp_path):
    """'0,9553' in a comma file with the age left empty: 11 fields for 10 columns, the extra one empty. Read as a
    trailing delimiter it would give L3 L2's BMD and L4 L3's; only as many empty extras as the header has pass."""
    path = tmp_path / "dxa.csv"
    path.write_text("patient_id,dxa_date,manufacturer,model,bmd_l1,bmd_l2,bmd_l3,bmd_l4,sex,age\n"
                    "p0,2018-11-13,Hologic,H,0,9553,1.0432,1.0426,1.0955,female,\n"
                    "p1,2020-11-05,Hologic,H,0.7103,0.9075,0.9273,0.8970,male,69\n"
                    "p2,2020-05-11,Hologic,H,0.6505,,0.7914,,female,\n")
    table, problems = read_dxa(path)
    assert list(table["patient_id"]) == ["p1", "p2"] and list(table["bmd_l3"]) == [0.9273, 0.7914]
    assert [(p.case, p.file, p.action, p.reason) for p in problems] == [
        ("dxa.csv line 2", "dxa.csv", QUARANTINED, "11 values for 10 columns (a stray ',' would shift every value after it)")]

    path.write_text("patient_id;dxa_date;manufacturer;model;bmd_l1;bmd_l2;bmd_l3;bmd_l4;sex;age;\n"  # Excel's trailing ';'
                    "p0;2018-11-13;Hologic;H;0;9553;1,0432;1,0426;1,0955;female;;\n"
                    "p1;2020-11-05;Hologic;H;0,7103;0,9075;0,9273;0,8970;male;69;\n"
                    "p2;2020-05-11;Hologic;H;0,6505;;0,7914;;female;;\n")
    table, problems = read_dxa(path)
    assert list(table["patient_id"]) == ["p1", "p2"] and list(table["bmd_l1"]) == [0.7103, 0.6505]
    assert [(p.case, p.reason) for p in problems] == [
        ("dxa.csv line 2", "12 values for 10 columns (a stray ';' would shift every value after it)")]


def test_a_lone_row_with_a_stray_decimal_comma_is_quarantined_not_shifted(tmp_path):
    """With one row (or every row ending in a delimiter) the extra empty field looks like an export's trailing
    delimiter. A row like that which also holds a number it cannot use ('0' and '9553' as BMDs) is left out
    whole: read as it stands, L3 would carry L2's BMD and L4 L3's. A trailing-delimiter export whose numbers
    all read is kept as it is."""
    path = tmp_path / "dxa.csv"
    path.write_text("patient_id,dxa_date,manufacturer,model,bmd_l1,bmd_l2,bmd_l3,bmd_l4,sex,age\n"
                    "p0,2018-11-13,Hologic,H,0,9553,1.0432,1.0426,1.0955,female,\n")
    table, problems = read_dxa(path)
    assert table.empty
    quarantined = [p.reason for p in problems if p.action == QUARANTINED]
    assert len(quarantined) == 1 and quarantined[0].startswith(
        "1 empty field(s) past the last column and a number it cannot use (implausible BMD 0.0 g/cm2")
    assert [p.level for p in problems if p.action == VALUE_DROPPED] == ["L1", "L2", "", ""]  # + sex, age

    path.write_text("patient_id,dxa_date,manufacturer,model,bmd_l1,bmd_l2,bmd_l3,bmd_l4,sex,age\n"
                    "p0,2018-11-13,Hologic,H,0.9553,1.0432,1.0426,1.0955,female,61,\n"
                    "p1,2020-11-05,Hologic,H,0.7103,0.9075,0.9273,0.8970,male,69,\n"
                    "p2,2020-11-05,Hologic,H,0.7103,0.9075,0.9273,0.8970,X,69,\n")
    table, problems = read_dxa(path)
    assert list(table["bmd_l4"]) == [1.0955, 0.8970, 0.8970] and list(table["age"]) == [61, 69, 69]
    assert [(p.case, p.action, p.reason) for p in problems] == [  # an unknown sex code is no sign of a shift
        ("dxa.csv line 4", VALUE_DROPPED, "unknown sex 'X' (expected female/f/w or male/m)")]


def test_one_exam_date_written_two_ways_is_a_duplicate_key(tmp_path):
    """2020-11-05 and 2020-11-5 are one exam: two BMDs for it, and pairing would take whichever came first."""
    table, problems = read_dxa(write(
        tmp_path,
        "p1,2020-11-05,Hologic,H,0.7103,0.9075,0.9273,0.8970,,,,,male,69",
        "p1,2020-11-5,Hologic,H,0.5103,0.6075,0.6273,0.6970,,,,,male,69",
        "p2,2020-1-5,Hologic,H,0.8,0.9,1.0,1.0,,,,,F,60",  # one row, however written: kept
        "p3,05.11.2020,Hologic,H,0.8,0.9,1.0,1.0,,,,,F,60",  # no date to compare: reported as such
        "p3,05.11.2020,Hologic,H,0.8,0.9,1.0,1.0,,,,,F,60",
    ))
    assert list(table["patient_id"]) == ["p2"] and table.iloc[0]["dxa_date"] == pd.Timestamp("2020-01-05")
    assert [(p.case, p.action, p.reason) for p in problems] == [
        ("dxa.csv line 2", QUARANTINED, "duplicate key patient_id+dxa_date (also on line 3)"),
        ("dxa.csv line 3", QUARANTINED, "duplicate key patient_id+dxa_date (also on line 2)"),
        ("dxa.csv line 5", QUARANTINED, "missing patient_id or dxa_date not YYYY-MM-DD"),
        ("dxa.csv line 6", QUARANTINED, "missing patient_id or dxa_date not YYYY-MM-DD")]


def test_a_cell_that_is_not_a_number_is_reported_not_taken_for_an_empty_one(tmp_path):
    """A typo, a unit, a qualifier or a spreadsheet's NaN is dropped with a word; the level is not labeled from
    it and the row's other values are kept. An empty cell still means "not measured" and is not reported."""
    table, problems = read_dxa(write(
        tmp_path,
        "p1,2024-01-10,Hologic,H,0.9O1,0.95 g/cm2,<0.5,1.02,85%,,,,female,70y",
        "p2,2024-01-10,Hologic,H,NaN,inf,,1.0,,,,,F,60",
        "p3,2024-01-10,Hologic,H,n/a,,,,,,,,F,60",
        "p4,2024-01-10,Hologic,H,1e0,\"0,95\",,,,,,,F,",
    ))
    assert list(table["patient_id"]) == ["p1", "p2", "p4"]
    p1, p2, p4 = (table.iloc[i].to_dict() for i in range(3))
    assert [level_labels(p1, level)["category"] for level in ("L1", "L2", "L3")] == [-1] * 3 and p1["bmd_l4"] == 1.02
    assert math.isnan(p1["t_l1"]) and math.isnan(p1["age"]) and p1["sex"] == "female"
    assert math.isnan(p2["bmd_l1"]) and math.isnan(p2["bmd_l2"]) and p2["bmd_l4"] == 1.0
    assert (p4["bmd_l1"], p4["bmd_l2"]) == (1.0, 0.95)
    assert [(p.case, p.level, p.action, p.reason) for p in problems] == [
        ("dxa.csv line 2", "L1", VALUE_DROPPED, "unreadable bmd_l1 '0.9O1' (not a number)"),
        ("dxa.csv line 2", "L2", VALUE_DROPPED, "unreadable bmd_l2 '0.95 g/cm2' (not a number)"),
        ("dxa.csv line 2", "L3", VALUE_DROPPED, "unreadable bmd_l3 '<0.5' (not a number)"),
        ("dxa.csv line 2", "L1", VALUE_DROPPED, "unreadable t_l1 '85%' (not a number)"),
        ("dxa.csv line 2", "", VALUE_DROPPED, "unreadable age '70y' (not a number)"),
        ("dxa.csv line 3", "L1", VALUE_DROPPED, "unreadable bmd_l1 'NaN' (not a number)"),
        ("dxa.csv line 3", "L2", VALUE_DROPPED, "unreadable bmd_l2 'inf' (not a number)"),
        ("dxa.csv line 4", "L1", VALUE_DROPPED, "unreadable bmd_l1 'n/a' (not a number)"),
        ("dxa.csv line 4", "", QUARANTINED, "no usable BMD at any level (missing, unreadable or implausible)")]
