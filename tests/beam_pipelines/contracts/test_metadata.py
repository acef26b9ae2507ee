"""beam_pipelines.contracts.metadata: how metadata.csv is read, and which rows it rejects.

The policy under test (README, "metadata.csv: what is read, what is
rejected"): UTF-8 with or without a BOM, UTF-16/UTF-32 by their BOM;
undecodable bytes reject their row (``bad_encoding``), never mojibake;
structural problems reject their row (``ragged_row``, ``malformed_row``)
unless the whole file is unusable (MetadataError, exit 2 before any work).
Where paths may point: storage/test_paths.py; URI schemes and validation:
transforms/test_rows.py; the jobs' exits and reconciliation:
test_metadata_robustness.py.
"""

from __future__ import annotations

import codecs
import io
import json
from typing import Any

import pytest

from beam_pipelines.contracts.metadata import MetadataError, iter_metadata, metadata_text
from beam_pipelines.transforms.rows import ValidRow, validate_row

HEADER = "PatientID,StudyID,DicomPath,ViewPosition,Abnormal,Age,Sex,Site\n"


def _outcomes(source: str | bytes, root: str = "/archive", **kwargs: Any) -> list[Any]:
    """Every row's validation outcome: a ValidRow or a reject record."""
    if isinstance(source, bytes):
        lines: str | io.TextIOWrapper = metadata_text(io.BytesIO(source))
    else:
        lines = source
    return [validate_row(r, c, root, **kwargs) for r, c in iter_metadata(lines)]


def _reasons(outcomes: list[Any]) -> list[str]:
    return ["kept" if isinstance(o, ValidRow) else o["reason"] for o in outcomes]


# --- Encodings ------------------------------------------------------------------

_TEXT = HEADER + "P1,S1,raw/café.dcm,PA,true,65,F,Zürich\nP2,S1,raw/b.dcm,AP,false,,,\n"


@pytest.mark.parametrize(
    "encoded",
    [
        _TEXT.encode("utf-8"),
        codecs.BOM_UTF8 + _TEXT.encode("utf-8"),
        codecs.BOM_UTF16_LE + _TEXT.encode("utf-16-le"),
        codecs.BOM_UTF16_BE + _TEXT.encode("utf-16-be"),
        _TEXT.encode("utf-16"),  # BOM in the machine's order
        codecs.BOM_UTF32_LE + _TEXT.encode("utf-32-le"),
        codecs.BOM_UTF32_BE + _TEXT.encode("utf-32-be"),
    ],
    ids=["utf8", "utf8-bom", "utf16le-bom", "utf16be-bom", "utf16", "utf32le-bom", "utf32be-bom"],
)
def test_unicode_encodings_read_the_same(encoded: bytes) -> None:
    outcomes = _outcomes(encoded)
    assert _reasons(outcomes) == ["kept", "kept"]
    first = outcomes[0]
    assert isinstance(first, ValidRow)
    assert first.dicom_path == "raw/café.dcm" and first.extra == {"Site": "Zürich"}


@pytest.mark.parametrize("codec", ["cp1252", "latin-1"])
def test_latin1_bytes_reject_their_rows_never_mojibake(codec: str) -> None:
    outcomes = _outcomes(_TEXT.encode(codec))
    assert _reasons(outcomes) == ["bad_encoding", "kept"]
    bad = outcomes[0]
    assert isinstance(bad, dict)
    # The path is shown with the byte escaped, not guessed at.
    assert bad["dicom_path"] == "raw/caf\\xe9.dcm"
    assert "0xE9" in bad["detail"] and "DicomPath" in bad["detail"] and "UTF-8" in bad["detail"]
    json.dumps(bad)  # JSON-safe (no lone surrogates)


def test_invalid_utf8_outside_the_path_still_rejects_the_row() -> None:
    data = HEADER.encode() + b"P1,S1,a.dcm,PA,true,,,\xff\xfe broken\nP2,S1,b.dcm,PA,true,,,\n"
    assert _reasons(_outcomes(data)) == ["bad_encoding", "kept"]


def test_nul_in_a_row_is_bad_encoding() -> None:
    assert _reasons(_outcomes(HEADER + "P1,S1,a\x00.dcm,PA,true,,,\n")) == ["bad_encoding"]


def test_utf16_without_bom_is_refused_with_advice() -> None:
    with pytest.raises(MetadataError, match="without a byte-order mark"):
        _outcomes(_TEXT.encode("utf-16-le"))


def test_undecodable_header_is_refused() -> None:
    with pytest.raises(MetadataError, match="header is not valid UTF-8"):
        _outcomes("PatientID,StudyID,DicomPath,Abnormal,Überweiser\n".encode("cp1252"))


def test_utf16_with_broken_bytes_is_an_error_not_garbage() -> None:
    data = codecs.BOM_UTF16_LE + HEADER.encode("utf-16-le") + b"\x00\xd8P\x001\x00"
    with pytest.raises(MetadataError):
        _outcomes(data)


# --- Structure --------------------------------------------------------------------


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


def test_crlf_cr_blank_lines_and_trailing_whitespace() -> None:
    text = (
        HEADER.replace("\n", "\r\n")
        + "P1,S1,a.dcm,PA,true,65,F,x   \r\n"
        + "\r\n   \r\n,,,,,,,\r\n"
        + 'P2, S1, "b,c.dcm" ,AP,0,,,"two\r\nlines"\t\r\n'
        + "P3,S1,d.dcm,PA,1,,,y\rP4,S1,e.dcm,PA,1,,,z"  # old Mac line ends, no final newline
    )
    outcomes = _outcomes(text)
    assert _reasons(outcomes) == ["kept"] * 4
    assert [o.row for o in outcomes] == [1, 2, 3, 4]
    assert [o.dicom_path for o in outcomes] == ["a.dcm", "b,c.dcm", "d.dcm", "e.dcm"]
    assert [o.extra["Site"] for o in outcomes] == ["x", "two\r\nlines", "y", "z"]


def test_header_names_are_stripped_and_leading_blank_lines_skipped() -> None:
    text = "\n\n PatientID , DicomPath ,Abnormal \nP1,a.dcm,true\n"
    assert _reasons(_outcomes(text)) == ["kept"]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("P1,S1,a.dcm,PA,true", "ragged_row"),  # too few cells
        ("P1,S1,a.dcm,PA,true,65,F,x,surplus", "ragged_row"),  # a non-blank cell past the header
        ("P1,S1,a.dcm,PA,true,65,F,x,,,", "kept"),  # trailing empty cells are not data
        ('P1,S1,"a.dcm"x,PA,true,65,F,5" film', "kept"),  # stray quotes stay on their line
    ],
)
def test_ragged_rows_are_rejected_with_reason(line: str, reason: str) -> None:
    outcomes = _outcomes(HEADER + line + "\nP2,S1,b.dcm,PA,true,,,\n")
    assert _reasons(outcomes) == [reason, "kept"]
    if reason != "kept":
        assert outcomes[0]["dicom_path"] == "a.dcm"
        assert "line 2" in outcomes[0]["detail"]


def test_header_with_trailing_comma_accepts_rows_without_it() -> None:
    assert _reasons(_outcomes(HEADER.rstrip("\n") + ",\nP1,S1,a.dcm,PA,true,,,\n")) == ["kept"]


def test_unclosed_quote_over_lines_is_one_malformed_row() -> None:
    text = (
        HEADER
        + 'P1,S1,"a.dcm,PA,true,,,\n'  # opened, never closed on its line
        + "P2,S1,b.dcm,PA,true,,,\n"
        + 'P3,S1,"c.dcm",PA,true,,,\n'  # its first quote closes P1's
        + "P4,S1,d.dcm,PA,true,,,\n"
    )
    outcomes = _outcomes(text)
    assert _reasons(outcomes) == ["malformed_row", "kept"]
    assert "lines 2-4" in outcomes[0]["detail"]
    assert outcomes[1].row == 2


def test_unclosed_quote_swallowing_the_file_is_an_error() -> None:
    text = HEADER + 'P1,S1,"a.dcm,PA,true,,,\n' + "P2,S1,b.dcm,PA,true,,,\n" * 10_000
    with pytest.raises(MetadataError, match="line 2: .*never closed"):
        _outcomes(text)


def test_duplicate_contract_column_is_refused() -> None:
    with pytest.raises(MetadataError, match=r"\['DicomPath'\] more than once"):
        list(iter_metadata("PatientID,DicomPath,Abnormal,DicomPath\nP1,a.dcm,true,b.dcm\n"))


def test_duplicate_extra_columns_keep_their_data() -> None:
    text = "PatientID,DicomPath,Abnormal,Note,Note,Note.1\nP1,a.dcm,true,x,y,z\n"
    ((_, cells),) = iter_metadata(text)
    assert {k: cells[k] for k in ("Note", "Note.1", "Note.2")} == {
        "Note": "x",
        "Note.2": "y",  # "Note.1" was taken by a real column
        "Note.1": "z",
    }


def test_unnamed_columns_are_ignored() -> None:
    ((_, cells),) = iter_metadata("PatientID,,DicomPath,Abnormal,\nP1,x,a.dcm,true,y\n")
    assert cells == {"PatientID": "P1", "DicomPath": "a.dcm", "Abnormal": "true"}


def test_empty_file_is_refused() -> None:
    with pytest.raises(MetadataError, match="empty"):
        list(iter_metadata(""))
    with pytest.raises(MetadataError, match="empty"):
        list(iter_metadata("\n\n"))
