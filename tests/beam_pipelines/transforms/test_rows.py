"""beam_pipelines.transforms.rows: reading and validating metadata.csv rows."""

from __future__ import annotations

import pytest

from beam_pipelines.contracts.metadata import MetadataError, iter_metadata
from beam_pipelines.storage.paths import resolve_path
from beam_pipelines.transforms.rows import ValidRow, validate_row

HEADER = "PatientID,StudyID,DicomPath,ViewPosition,Abnormal,Age,Sex,Site\n"


def test_bom_quotes_blank_lines_and_extra_columns() -> None:
    text = (
        "\ufeff" + HEADER + 'P1,S1,a.dcm,PA,true,065Y,F,"north, wing ""B"""\n'
        "\n"
        'P2,S1,"b,c.dcm",AP,0,,,"two\nlines"\n'
        ",,,,,,,\n"
    )
    rows = list(iter_metadata(text))
    assert [r for r, _ in rows] == [1, 2]
    assert rows[0][1]["Site"] == 'north, wing "B"'
    assert rows[1][1]["DicomPath"] == "b,c.dcm" and rows[1][1]["Site"] == "two\nlines"


def test_missing_required_columns_named() -> None:
    with pytest.raises(MetadataError, match=r"\['DicomPath', 'Abnormal'\]"):
        list(iter_metadata("PatientID,Path\nP1,a\n"))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("raw/a.dcm", "/archive/raw/a.dcm"),
        ("./raw/../raw/a.dcm", "/archive/raw/a.dcm"),
        ("../outside.dcm", None),
        ("raw/../../outside.dcm", None),
        ("/etc/passwd", None),
        ("/archive/raw/a.dcm", "/archive/raw/a.dcm"),
        ("gs://bucket/a.dcm", "gs://bucket/a.dcm"),
    ],
)
def test_resolve_path(path: str, expected: str | None) -> None:
    assert resolve_path("/archive", path) == expected


def test_resolve_path_under_uri_root() -> None:
    assert resolve_path("gs://bucket/archive", "raw/a.dcm") == "gs://bucket/archive/raw/a.dcm"
    assert resolve_path("gs://bucket/archive", "../other/a.dcm") is None


def _cells(**overrides: str) -> dict[str, str]:
    cells = {
        "PatientID": "P1",
        "StudyID": "S1",
        "DicomPath": "a.dcm",
        "ViewPosition": "pa",
        "Abnormal": "Yes",
        "Age": "65",
        "Sex": "f",
        "Site": "x",
    }
    cells.update(overrides)
    return cells


def test_valid_row_is_parsed() -> None:
    row = validate_row(3, _cells(), "/archive")
    assert isinstance(row, ValidRow)
    assert (row.row, row.abnormal, row.age, row.sex, row.view_position) == (3, True, 65, "F", "PA")
    assert row.extra == {"Site": "x"}


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"DicomPath": ""}, "missing_path"),
        ({"PatientID": "  "}, "missing_patient_id"),
        ({"Abnormal": "maybe"}, "bad_label"),
        ({"Abnormal": ""}, "bad_label"),
        ({"DicomPath": "../x.dcm"}, "path_escapes_root"),
    ],
)
def test_invalid_rows_are_rejected_with_reason(overrides: dict, reason: str) -> None:
    result = validate_row(7, _cells(**overrides), "/archive")
    assert isinstance(result, dict)
    assert result["reason"] == reason and result["row"] == 7 and result["stage"] == "validate"


def test_bad_age_or_sex_makes_the_field_unknown() -> None:
    row = validate_row(1, _cells(Age="old", Sex="?"), "/archive")
    assert isinstance(row, ValidRow) and row.age is None and row.sex is None
