"""Bad metadata.csv input: encodings, CSV structure, paths and URI schemes.

The policy under test (README, "metadata.csv: what is read, what is
rejected"): UTF-8 with or without a BOM, UTF-16/UTF-32 by their BOM;
undecodable bytes reject their row (``bad_encoding``), never mojibake;
structural problems reject their row (``ragged_row``, ``malformed_row``)
unless the whole file is unusable (MetadataError, exit 2 before any work);
paths may not leave the archive root, also not through symlinks; URIs are
read only for allowed schemes.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines import options
from beam_pipelines.contracts.metadata import (
    SCORING_REQUIRED_COLUMNS,
    MetadataError,
    iter_metadata,
    metadata_text,
)
from beam_pipelines.contracts.rejects import VALIDATE_REASONS
from beam_pipelines.storage.paths import resolve_path
from beam_pipelines.transforms.outcomes import SplitOutcomes
from beam_pipelines.transforms.rows import (
    ReadMetadataFn,
    ValidateRowFn,
    ValidRow,
    check_metadata,
    read_metadata,
    validate_row,
)

HEADER = "PatientID,StudyID,DicomPath,ViewPosition,Abnormal,Age,Sex,Site\n"
REPO = Path(__file__).resolve().parents[2]


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


def test_scoring_needs_only_the_path_column() -> None:
    text = "DicomPath\na.dcm\n"
    ((row, cells),) = iter_metadata(text, SCORING_REQUIRED_COLUMNS)
    assert isinstance(validate_row(row, cells, "/archive", scoring=True), ValidRow)


def test_check_metadata_reads_only_the_header(tmp_path: Path) -> None:
    path = tmp_path / "metadata.csv"
    # A row the reader would stop at (a quoted field past the size limit):
    # the header check does not get there.
    path.write_text(HEADER + 'P1,S1,"' + "x" * 200_000 + "\n")
    check_metadata(str(path))
    with pytest.raises(MetadataError, match="never closed"):
        list(read_metadata(str(path)))
    path.write_text("PatientID,Path\nP1,a.dcm\n")
    with pytest.raises(MetadataError, match=r"lacks required columns \['DicomPath', 'Abnormal'\]"):
        check_metadata(str(path))


# --- Scale ----------------------------------------------------------------------


def _write_rows(path: Path, count: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER.strip().split(","))
        for i in range(count):
            patient = f"P{i // 3:07d}"
            writer.writerow(
                [patient, f"S{i // 3}", f"raw/{patient}/{i % 3}.dcm", "PA", i % 2, 40, "F", "s"]
            )


def _stream_peak(path: Path) -> tuple[int, int]:
    """(rows read, peak traced bytes) of read_metadata over a file."""
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_metadata(str(path)))
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reading_streams_one_row_at_a_time(tmp_path: Path) -> None:
    small, large = tmp_path / "small.csv", tmp_path / "large.csv"
    _write_rows(small, 5_000)
    _write_rows(large, 40_000)
    count_small, peak_small = _stream_peak(small)
    count_large, peak_large = _stream_peak(large)
    assert (count_small, count_large) == (5_000, 40_000)
    # 8x the rows (1.6 MB more text) and the peak (the 1 MiB read buffer)
    # does not move: the file is never held whole, nor are its rows.
    # (validate_row then handles one row at a time, holding nothing.)
    assert large.stat().st_size - small.stat().st_size > 1_500_000
    assert peak_large < peak_small + 200_000, (peak_small, peak_large)


def test_100k_rows_validate_in_seconds(tmp_path: Path) -> None:
    lines = [HEADER]
    for i in range(100_000):
        lines.append(f"P{i // 3:07d},S1,raw/P{i // 3:07d}/{i % 3}.dcm,PA,{i % 2},40,F,s\n")
    text = "".join(lines)
    start = time.perf_counter()
    outcomes = [validate_row(r, c, str(tmp_path)) for r, c in iter_metadata(text)]
    elapsed = time.perf_counter() - start
    kept = [o for o in outcomes if isinstance(o, ValidRow)]
    assert len(kept) == 100_000 and kept[-1].row == 100_000
    # About 3 s on the shared 2-core build machine; linear, so 10^6 take ~30 s.
    assert elapsed < 30, elapsed


# --- Paths and symlinks -------------------------------------------------------------


@pytest.fixture
def linked_archive(tmp_path: Path) -> Path:
    """archive/ with symlinks that stay inside and ones that lead outside."""
    root, outside = tmp_path / "archive", tmp_path / "outside"
    (root / "raw" / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "raw" / "a.dcm").write_bytes(b"inside")
    (outside / "secret.dcm").write_bytes(b"outside")
    (root / "inner_link.dcm").symlink_to(root / "raw" / "a.dcm")
    (root / "relative_inner_link.dcm").symlink_to("raw/a.dcm")
    (root / "inner_dir").symlink_to(root / "raw")
    (root / "escape_link.dcm").symlink_to(outside / "secret.dcm")
    (root / "raw" / "sub" / "relative_escape.dcm").symlink_to("../../../outside/secret.dcm")
    (root / "escape_dir").symlink_to(outside)
    (root / "raw" / "chain.dcm").symlink_to(root / "escape_link.dcm")
    (root / "dangling_escape.dcm").symlink_to(outside / "missing.dcm")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    return root


@pytest.mark.parametrize(
    ("path", "inside"),
    [
        ("raw/a.dcm", True),
        ("inner_link.dcm", True),
        ("relative_inner_link.dcm", True),
        ("inner_dir/a.dcm", True),
        ("raw/missing.dcm", True),  # missing files are the decoder's to report
        ("escape_link.dcm", False),
        ("raw/sub/relative_escape.dcm", False),
        ("escape_dir/secret.dcm", False),
        ("escape_dir/missing.dcm", False),
        ("raw/chain.dcm", False),
        ("dangling_escape.dcm", False),
    ],
)
def test_symlinks_may_not_leave_the_root(linked_archive: Path, path: str, inside: bool) -> None:
    resolved = resolve_path(str(linked_archive), path)
    assert (resolved is not None) == inside
    if inside:
        assert resolved == f"{linked_archive}/{path}"  # the lexical path, as written
    result = validate_row(1, _cells(path), str(linked_archive))
    assert isinstance(result, ValidRow) == inside
    if not inside:
        assert isinstance(result, dict) and result["reason"] == "path_escapes_root"
        assert "symlink" in result["detail"]


def test_symlink_loop_is_not_an_escape_error(linked_archive: Path) -> None:
    # A loop resolves nowhere outside; the decoder will report it unreadable.
    assert resolve_path(str(linked_archive), "loop_a") is not None


def test_root_reached_through_a_symlink(linked_archive: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(linked_archive)
    assert resolve_path(str(alias), "inner_link.dcm") == f"{alias}/inner_link.dcm"
    assert resolve_path(str(alias), "escape_link.dcm") is None
    assert resolve_path(str(alias), f"{linked_archive}/raw/a.dcm") is None  # lexically outside


# --- URI schemes ----------------------------------------------------------------------


def _cells(path: str) -> dict[str, str]:
    return {"PatientID": "P1", "StudyID": "S1", "DicomPath": path, "Abnormal": "true"}


@pytest.mark.parametrize(
    "path",
    [
        "s3://bucket/a.dcm",
        "http://example.org/a.dcm",
        "HTTPS://example.org/a.dcm",
        "file:///etc/passwd",
        "gs://bucket/a.dcm",
    ],
)
def test_uris_of_other_schemes_are_rejected_under_a_local_root(path: str) -> None:
    result = validate_row(1, _cells(path), "/archive")
    assert isinstance(result, dict) and result["reason"] == "scheme_not_allowed"
    assert "--allowed_schemes" in result["detail"] and result["dicom_path"] == path


def test_allowed_schemes_open_uris() -> None:
    allowed = frozenset({"s3", "gs"})
    for path in ("s3://bucket/a.dcm", "GS://bucket/a.dcm"):
        row = validate_row(1, _cells(path), "/archive", allowed_schemes=allowed)
        assert isinstance(row, ValidRow) and row.resolved_path == path
    rejected = validate_row(1, _cells("http://h/a.dcm"), "/archive", allowed_schemes=allowed)
    assert isinstance(rejected, dict) and rejected["reason"] == "scheme_not_allowed"
    assert "gs, s3" in rejected["detail"]


def test_the_root_scheme_is_allowed_by_default() -> None:
    row = validate_row(1, _cells("gs://other/a.dcm"), "gs://bucket/archive")
    assert isinstance(row, ValidRow)
    rel = validate_row(1, _cells("raw/a.dcm"), "gs://bucket/archive")
    assert isinstance(rel, ValidRow) and rel.resolved_path == "gs://bucket/archive/raw/a.dcm"
    other = validate_row(1, _cells("s3://b/a.dcm"), "gs://bucket/archive")
    assert isinstance(other, dict) and other["reason"] == "scheme_not_allowed"


def test_not_uris_stay_relative_paths() -> None:
    # Only "scheme://" makes a URI; these are (odd) relative file names.
    for path in ("s3:/bucket/a.dcm", "c:a.dcm", "1gs://b/a.dcm"):
        assert isinstance(validate_row(1, _cells(path), "/archive"), ValidRow)


def test_allowed_schemes_flag() -> None:
    parser = argparse.ArgumentParser()
    options.add_input_arguments(parser)
    args = parser.parse_args(["--allowed_schemes", " S3, gs:// ,,hdfs"])
    assert options.allowed_schemes(args, "/archive", "/archive/metadata.csv") == {
        "s3",
        "gs",
        "hdfs",
    }
    default = parser.parse_args([])
    assert options.allowed_schemes(default, "/archive", "/archive/m.csv") == frozenset()
    assert options.allowed_schemes(default, "gs://b/archive", "s3://c/m.csv") == {"gs", "s3"}
    with pytest.raises(ValueError, match="not a URI scheme"):
        options.allowed_schemes(parser.parse_args(["--allowed_schemes", "g s"]))


# --- In a pipeline ------------------------------------------------------------------------


def test_bad_rows_cross_beam_coders(tmp_path: Path) -> None:
    """Reject records of undecodable rows are valid text for every coder on the way."""
    path = tmp_path / "metadata.csv"
    path.write_bytes(
        HEADER.encode()
        + "P1,S1,é.dcm,PA,true,,,\n".encode("cp1252")
        + b"P2,S1,b.dcm,PA,true,,,\n"
        + b"P3,S1,s3://b/c.dcm,PA,true,,,\n"
        + b"P4,S1,d.dcm,PA\n"
    )
    with TestPipeline() as pipeline:
        valid, rejected = (
            pipeline
            | beam.Create([str(path)])
            | beam.ParDo(ReadMetadataFn())
            | beam.Reshuffle()
            | beam.ParDo(ValidateRowFn(str(tmp_path), allowed_schemes=frozenset()))
            | SplitOutcomes()
        )
        assert_that(valid | "Rows" >> beam.Map(lambda r: r.row), equal_to([2]), label="valid")
        assert_that(
            rejected | beam.Map(lambda r: (r["row"], r["reason"], r["dicom_path"])),
            equal_to(
                [
                    (1, "bad_encoding", "\\xe9.dcm"),
                    (3, "scheme_not_allowed", "s3://b/c.dcm"),
                    (4, "ragged_row", "d.dcm"),
                ]
            ),
            label="rejected",
        )


# --- Command line ----------------------------------------------------------------------------


def _cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.fixture
def no_dicom_path_csv(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "metadata.csv"
    path.parent.mkdir()
    path.write_text("PatientID,Path,Label\nP1,a.dcm,true\n")
    return path


def test_preprocess_cli_missing_columns_exit_before_any_output(
    no_dicom_path_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = _cli(
        "beam_pipelines.preprocess", "--metadata", str(no_dicom_path_csv), "--output_dir", str(out)
    )
    assert done.returncode == 2, done.stderr
    assert "lacks required columns ['DicomPath', 'Abnormal']" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_score_cli_missing_columns_exit_before_any_output(
    no_dicom_path_csv: Path, tmp_path: Path
) -> None:
    model = tmp_path / "results" / "model"
    model.mkdir(parents=True)
    (model / "model.keras").write_bytes(b"")  # never loaded: the CSV check comes first
    out = tmp_path / "scores"
    out.mkdir()
    (out / "archive.summary.json").write_text("{}")  # an earlier run's output stays
    done = _cli(
        "beam_pipelines.score",
        "--model",
        str(model),
        "--metadata",
        str(no_dicom_path_csv),
        "--output",
        str(out / "archive"),
    )
    assert done.returncode == 2, done.stderr
    assert "lacks required columns ['DicomPath']" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["archive.summary.json"]


def test_cli_bad_allowed_schemes_exit(tmp_path: Path) -> None:
    csv_path = tmp_path / "metadata.csv"
    csv_path.write_text(HEADER)
    done = _cli(
        "beam_pipelines.preprocess",
        "--metadata",
        str(csv_path),
        "--output_dir",
        str(tmp_path / "out"),
        "--allowed_schemes",
        "gs,not a scheme",
    )
    assert done.returncode == 2 and "--allowed_schemes: not a URI scheme" in done.stderr


# --- End to end: every new reason reconciles in the manifest and the summary ----------------------

_LOCAL = ["--runner=FnApiRunner", "--direct_running_mode=in_memory"]
#: (row, reason) of every broken row of `broken_archive`.
_EXPECTED_REJECTS = [
    (4, "path_escapes_root"),
    (5, "path_escapes_root"),
    (6, "scheme_not_allowed"),
    (7, "scheme_not_allowed"),
    (8, "bad_encoding"),
    (9, "ragged_row"),
    (10, "malformed_row"),
]


@pytest.fixture
def broken_archive(synthetic_archive: Path, tmp_path: Path) -> Path:
    """archive/metadata.csv: 3 good rows (one through an inner symlink), 7 of the new reasons."""
    with (synthetic_archive / "metadata.csv").open(newline="") as handle:
        good = list(csv.DictReader(handle))[:3]
    root, outside = tmp_path / "archive", tmp_path / "outside"
    (root / "raw").mkdir(parents=True)
    outside.mkdir()
    for k, row in enumerate(good):
        shutil.copy(synthetic_archive / row["DicomPath"], root / "raw" / f"{k}.dcm")
    shutil.copy(synthetic_archive / good[0]["DicomPath"], outside / "secret.dcm")
    (root / "inner_link.dcm").symlink_to(root / "raw" / "2.dcm")
    (root / "escape_link.dcm").symlink_to(outside / "secret.dcm")
    (root / "escape_dir").symlink_to(outside)

    def line(patient: str, path: str) -> bytes:
        return f"{patient},S,{path},PA,{'true' if patient[-1] in '13' else 'false'},40,F\n".encode()

    data = (
        b"PatientID,StudyID,DicomPath,ViewPosition,Abnormal,Age,Sex\r\n"
        + line("Q1", "raw/0.dcm")
        + line("Q2", "raw/1.dcm")
        + line("Q3", "inner_link.dcm")
        + line("Q4", "escape_link.dcm")
        + line("Q5", "escape_dir/secret.dcm")
        + line("Q6", "http://example.invalid/a.dcm")
        + line("Q7", "file:///etc/passwd")
        + line("Q8", "raw/0.dcm").replace(b"raw/0", b"raw/\xe9")
        + b"Q9,S,raw/1.dcm,PA\n"
        + b'Q10,S,"raw/1.dcm,PA,true,40,F\n'
        + b'Q11,S,"raw/2.dcm",PA,true,40,F\n'  # taken into Q10's row by its open quote
    )
    (root / "metadata.csv").write_bytes(data)
    return root


def _reject_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(r) for r in path.read_text().splitlines()]


@pytest.mark.slow
def test_preprocess_manifest_counts_every_reason(broken_archive: Path, tmp_path: Path) -> None:
    from beam_pipelines import preprocess

    out = tmp_path / "pre"
    manifest = preprocess.run(
        ["--metadata", str(broken_archive / "metadata.csv"), "--output_dir", str(out), *_LOCAL]
    )
    assert (manifest["input_rows"], manifest["kept"]) == (10, 3)
    assert manifest["rejected_by_reason"] == {
        "bad_encoding": 1,
        "malformed_row": 1,
        "path_escapes_root": 2,
        "ragged_row": 1,
        "scheme_not_allowed": 2,
    }
    assert manifest["options"]["allowed_schemes"] == []
    rejects = _reject_lines(out / "rejects" / "rejects.jsonl")
    assert [(r["row"], r["reason"]) for r in rejects] == _EXPECTED_REJECTS
    assert rejects[4]["dicom_path"] == "raw/\\xe9.dcm"


@pytest.mark.slow
def test_score_summary_counts_every_reason(
    broken_archive: Path, trained_model: Path, tmp_path: Path
) -> None:
    from beam_pipelines import score

    prefix = tmp_path / "scores" / "archive"
    summary = score.run(
        [
            "--model",
            str(trained_model / "model"),
            "--metadata",
            str(broken_archive / "metadata.csv"),
            "--output",
            str(prefix),
            *_LOCAL,
        ]
    )
    assert (summary["inputs"], summary["scored"]) == (10, 3)
    assert summary["rejected_by_reason"] == {
        "bad_encoding": 1,
        "malformed_row": 1,
        "path_escapes_root": 2,
        "ragged_row": 1,
        "scheme_not_allowed": 2,
    }
    rejects = _reject_lines(prefix.parent / "rejects" / "archive.jsonl")
    assert [(r["row"], r["reason"]) for r in rejects] == _EXPECTED_REJECTS


def test_readme_lists_every_validate_reason() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [r for r in VALIDATE_REASONS if f"`{r}`" not in readme]
    assert not missing, f"README lists no {missing}"
