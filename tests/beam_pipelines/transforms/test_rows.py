"""beam_pipelines.transforms.rows: validating metadata.csv rows, reading them, ReadValidRows."""

from __future__ import annotations

import csv
import os
import time
import tracemalloc
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines.contracts.metadata import (
    SCORING_REQUIRED_COLUMNS,
    MetadataError,
    iter_metadata,
)
from beam_pipelines.privacy import Pseudonymizer
from beam_pipelines.transforms.outcomes import SplitOutcomes
from beam_pipelines.transforms.rows import (
    ReadMetadataFn,
    ReadValidRows,
    RejectDuplicatePaths,
    ValidateRowFn,
    ValidRow,
    check_metadata,
    read_metadata,
    validate_row,
)
from tests.support.inputs import valid_row

HEADER = "PatientID,StudyID,DicomPath,ViewPosition,Abnormal,Age,Sex,Site\n"


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


def test_scoring_needs_only_the_path_column() -> None:
    text = "DicomPath\na.dcm\n"
    ((row, cells),) = iter_metadata(text, SCORING_REQUIRED_COLUMNS)
    assert isinstance(validate_row(row, cells, "/archive", scoring=True), ValidRow)


# --- URI schemes ----------------------------------------------------------------------


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
    result = validate_row(1, _cells(DicomPath=path), "/archive")
    assert isinstance(result, dict) and result["reason"] == "scheme_not_allowed"
    assert "--allowed_schemes" in result["detail"] and result["dicom_path"] == path


def test_a_dicomweb_instance_without_its_service_names_the_flag() -> None:
    path = "dicomweb+http://pacs:8042/dicom-web/studies/1/series/2/instances/3"
    result = validate_row(1, _cells(DicomPath=path), "/archive")
    assert isinstance(result, dict) and result["reason"] == "scheme_not_allowed"
    assert "--dicomweb_url" in result["detail"]
    allowed = frozenset({"dicomweb+http"})
    row = validate_row(1, _cells(DicomPath=path), "/archive", allowed_schemes=allowed)
    assert isinstance(row, ValidRow) and row.resolved_path == path


def test_allowed_schemes_open_uris() -> None:
    allowed = frozenset({"s3", "gs"})
    for path in ("s3://bucket/a.dcm", "GS://bucket/a.dcm"):
        row = validate_row(1, _cells(DicomPath=path), "/archive", allowed_schemes=allowed)
        assert isinstance(row, ValidRow) and row.resolved_path == path
    rejected = validate_row(
        1, _cells(DicomPath="http://h/a.dcm"), "/archive", allowed_schemes=allowed
    )
    assert isinstance(rejected, dict) and rejected["reason"] == "scheme_not_allowed"
    assert "gs, s3" in rejected["detail"]


def test_the_root_scheme_is_allowed_by_default() -> None:
    row = validate_row(1, _cells(DicomPath="gs://other/a.dcm"), "gs://bucket/archive")
    assert isinstance(row, ValidRow)
    rel = validate_row(1, _cells(DicomPath="raw/a.dcm"), "gs://bucket/archive")
    assert isinstance(rel, ValidRow) and rel.resolved_path == "gs://bucket/archive/raw/a.dcm"
    other = validate_row(1, _cells(DicomPath="s3://b/a.dcm"), "gs://bucket/archive")
    assert isinstance(other, dict) and other["reason"] == "scheme_not_allowed"


def test_not_uris_stay_relative_paths() -> None:
    # Only "scheme://" makes a URI; these are (odd) relative file names.
    for path in ("s3:/bucket/a.dcm", "c:a.dcm", "1gs://b/a.dcm"):
        assert isinstance(validate_row(1, _cells(DicomPath=path), "/archive"), ValidRow)


# --- Reading metadata.csv ------------------------------------------------------------------


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


# --- In a pipeline -------------------------------------------------------------------------


def test_validate_rows_routes_rejects() -> None:
    with TestPipeline() as pipeline:
        valid, rejected = (
            pipeline
            | beam.Create(
                [
                    (1, _cells(DicomPath="a.dcm")),
                    (2, _cells(DicomPath="b.dcm", Abnormal="maybe")),
                    (3, _cells(DicomPath="../c.dcm")),
                ]
            )
            | beam.ParDo(ValidateRowFn("/archive"))
            | SplitOutcomes()
        )
        assert_that(valid | "Rows" >> beam.Map(lambda r: r.row), equal_to([1]), label="valid")
        assert_that(
            rejected | beam.Map(lambda r: (r["row"], r["reason"])),
            equal_to([(2, "bad_label"), (3, "path_escapes_root")]),
            label="rejected",
        )


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


def test_duplicate_paths_keep_the_first_row() -> None:
    rows = [
        valid_row(5, "a.dcm"),
        valid_row(2, "a.dcm"),
        valid_row(9, "a.dcm"),
        valid_row(3, "b.dcm"),
    ]
    with TestPipeline() as pipeline:
        kept, rejected = pipeline | beam.Create(rows) | RejectDuplicatePaths() | SplitOutcomes()
        assert_that(kept | "Rows" >> beam.Map(lambda r: r.row), equal_to([2, 3]), label="kept")
        assert_that(
            rejected | beam.Map(lambda r: (r["row"], r["reason"], r["detail"])),
            equal_to(
                [
                    (5, "duplicate_path", "same file as row 2"),
                    (9, "duplicate_path", "same file as row 2"),
                ]
            ),
            label="rejected",
        )


def test_symlinks_to_one_file_are_duplicates(tmp_path: Path) -> None:
    (tmp_path / "by_patient").mkdir()
    (tmp_path / "by_patient" / "img.dcm").write_bytes(b"x")
    (tmp_path / "by_date").symlink_to("by_patient", target_is_directory=True)
    (tmp_path / "link.dcm").symlink_to("by_patient/img.dcm")
    os.link(tmp_path / "by_patient" / "img.dcm", tmp_path / "hard.dcm")
    root = str(tmp_path)
    paths = ["by_date/img.dcm", "by_patient/img.dcm", "link.dcm", "hard.dcm"]
    rows = [valid_row(n, path, root) for n, path in enumerate(paths, start=1)]
    with TestPipeline() as pipeline:
        kept, rejected = pipeline | beam.Create(rows) | RejectDuplicatePaths() | SplitOutcomes()
        # A hard link is another file (same bytes, like any copy): kept.
        assert_that(kept | "Rows" >> beam.Map(lambda r: r.row), equal_to([1, 4]), label="kept")
        assert_that(
            rejected | beam.Map(lambda r: (r["row"], r["detail"])),
            equal_to([(2, "same file as row 1"), (3, "same file as row 1")]),
            label="rejected",
        )


@pytest.mark.parametrize("key", [None, b"0123456789abcdef"], ids=["plain", "pseudonymized"])
def test_read_valid_rows_counts_every_row_keeps_one_per_file_rejects_the_rest(
    tmp_path: Path, key: bytes | None
) -> None:
    (tmp_path / "a.dcm").write_bytes(b"a")
    (tmp_path / "c.dcm").write_bytes(b"c")
    (tmp_path / "link.dcm").symlink_to("a.dcm")
    metadata = tmp_path / "metadata.csv"
    metadata.write_text(
        HEADER
        + "P1,S1,a.dcm,PA,true,,,\n"
        + "P2,S1,b.dcm,PA,maybe,,,\n"  # bad_label
        + "P3,S2,link.dcm,PA,false,,,\n"  # the file of row 1 again
        + "P4,S1,../x.dcm,PA,true,,,\n"  # path_escapes_root
        + "P5,S3,c.dcm,AP,0,,,\n"
    )
    pseudonymizer = Pseudonymizer(key) if key else None
    shown = pseudonymizer or (lambda value: value)
    with TestPipeline() as pipeline:
        rows, unique, rejects = pipeline | ReadValidRows(
            str(metadata), str(tmp_path), frozenset(), pseudonymizer=pseudonymizer
        )
        assert_that(rows | "Read" >> beam.Map(lambda r: r[0]), equal_to([1, 2, 3, 4, 5]))
        assert_that(
            unique
            | "Unique"
            >> beam.Map(lambda r: (r.row, r.patient_id, r.study_id, r.dicom_path, r.resolved_path)),
            equal_to(
                [
                    (1, shown("P1"), shown("S1"), shown("a.dcm"), f"{tmp_path}/a.dcm"),
                    (5, shown("P5"), shown("S3"), shown("c.dcm"), f"{tmp_path}/c.dcm"),
                ]
            ),
            label="unique",
        )
        assert_that(
            rejects | "Rejects" >> beam.Map(lambda r: (r["row"], r["dicom_path"], r["reason"])),
            equal_to(
                [
                    (2, shown("b.dcm"), "bad_label"),
                    (3, shown("link.dcm"), "duplicate_path"),
                    (4, shown("../x.dcm"), "path_escapes_root"),
                ]
            ),
            label="rejects",
        )
