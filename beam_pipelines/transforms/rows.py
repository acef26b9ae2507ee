"""The first stages of both jobs: metadata.csv rows -> valid rows or reject records.

A row becomes either a :class:`ValidRow` or a reject record; it is never
dropped. The reading rules are the metadata contract's
(:mod:`beam_pipelines.contracts.metadata`); where a path may point is
:mod:`beam_pipelines.storage.paths`'.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Collection, Iterable, Iterator
from typing import IO, Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipelines.console import announce_total
from beam_pipelines.contracts import metadata as md
from beam_pipelines.contracts.rejects import reject
from beam_pipelines.privacy import Pseudonymizer
from beam_pipelines.storage.paths import (
    allowed_schemes_for,
    file_identity,
    resolve_path,
    uri_scheme,
)
from beam_pipelines.transforms.outcomes import KEPT, REJECTED, SplitOutcomes


@dataclasses.dataclass(frozen=True)
class ValidRow:
    """A metadata row that passed validation; ``row`` is its 1-based data row."""

    row: int
    patient_id: str
    study_id: str
    dicom_path: str
    resolved_path: str
    view_position: str
    abnormal: bool | None
    age: int | None
    sex: str | None
    extra: dict[str, str]


@contextlib.contextmanager
def open_metadata(path: str) -> Iterator[IO[str]]:
    """metadata.csv (path or URI, compressed or not) as text, by the encoding policy."""
    with FileSystems.open(path) as handle:
        yield md.metadata_text(handle)


def read_metadata(
    path: str, required: tuple[str, ...] = md.REQUIRED_COLUMNS
) -> Iterator[tuple[int, dict[str, str]]]:
    """:func:`~beam_pipelines.contracts.metadata.iter_metadata` streamed from a file."""
    with open_metadata(path) as text:
        yield from md.iter_metadata(text, required)


def check_metadata(path: str, required: tuple[str, ...] = md.REQUIRED_COLUMNS) -> None:
    """Reads only the header of metadata.csv: the check a job makes before any work.

    Raises:
        MetadataError: as :func:`~beam_pipelines.contracts.metadata.iter_metadata` does.
    """
    with open_metadata(path) as text:
        md.check_header(text, required)


def validate_row(
    row: int,
    cells: dict[str, str],
    archive_root: str,
    scoring: bool = False,
    allowed_schemes: Collection[str] | None = None,
) -> ValidRow | dict[str, Any]:
    """Validates one row; returns a ValidRow or a reject record.

    With ``scoring=True`` (scoring archives that may be unlabelled) a blank
    Abnormal cell gives ``abnormal=None`` and a blank PatientID is left for
    the DICOM header to fill; a non-blank invalid label is still rejected.
    A DicomPath URI is read only if its scheme is in ``allowed_schemes``
    (default: the archive root's scheme, if it has one); others are rejected
    as ``scheme_not_allowed``.
    """
    broken = md.problem(cells)
    if broken:
        return reject(row, cells.get(md.DICOM_PATH, ""), "validate", *broken)
    dicom_path = (cells.get(md.DICOM_PATH) or "").strip()
    patient_id = (cells.get(md.PATIENT_ID) or "").strip()
    if not dicom_path:
        return reject(row, dicom_path, "validate", "missing_path", "DicomPath is blank")
    if not patient_id and not scoring:
        return reject(row, dicom_path, "validate", "missing_patient_id", "PatientID is blank")
    label = md.parse_label(cells.get(md.ABNORMAL))
    if label is None and (not scoring or (cells.get(md.ABNORMAL) or "").strip()):
        return reject(
            row, dicom_path, "validate", "bad_label", "Abnormal is not true/false/1/0/yes/no"
        )
    scheme = uri_scheme(dicom_path)
    if scheme is not None:
        allowed = (
            allowed_schemes if allowed_schemes is not None else allowed_schemes_for([archive_root])
        )
        if scheme not in allowed:
            shown = ", ".join(sorted(allowed)) or "none: local paths only"
            hint = (
                "--dicomweb_url names the service whose instances are read"
                if scheme.startswith("dicomweb+")
                else "--allowed_schemes adds schemes"
            )
            return reject(
                row,
                dicom_path,
                "validate",
                "scheme_not_allowed",
                f"{scheme}:// is not an allowed scheme (allowed: {shown}); {hint}",
            )
    resolved = resolve_path(archive_root, dicom_path)
    if resolved is None:
        return reject(
            row,
            dicom_path,
            "validate",
            "path_escapes_root",
            "DicomPath leaves the archive root (directly or through a symlink)",
        )
    extra = {k: v for k, v in cells.items() if k not in md.COLUMNS}
    return ValidRow(
        row=row,
        patient_id=patient_id,
        study_id=(cells.get(md.STUDY_ID) or "").strip(),
        dicom_path=dicom_path,
        resolved_path=resolved,
        view_position=(cells.get(md.VIEW_POSITION) or "").strip().upper(),
        abnormal=label,
        age=md.parse_age(cells.get(md.AGE)),
        sex=md.parse_sex(cells.get(md.SEX)),
        extra=extra,
    )


class ReadMetadataFn(beam.DoFn):
    """Reads metadata.csv on one worker, streaming, and emits (row, cells).

    One sequential read keeps row numbers exact and handles quoted newlines;
    only one row is held at a time. 10^6 rows take seconds
    (``benchmarks/metadata_scale.py``), and a Reshuffle spreads the rest. The
    row count becomes the total of the driver's progress bar (read once, here).
    """

    def __init__(self, required: tuple[str, ...] = md.REQUIRED_COLUMNS) -> None:
        self._required = required

    def process(self, path: str) -> Iterator[tuple[int, dict[str, str]]]:
        rows = 0
        for rows, cells in read_metadata(path, self._required):
            yield rows, cells
        announce_total(rows)


class ValidateRowFn(beam.DoFn):
    """Turns raw cells into (KEPT, ValidRow) or (REJECTED, reject record)."""

    def __init__(
        self,
        archive_root: str,
        scoring: bool = False,
        allowed_schemes: Collection[str] | None = None,
    ) -> None:
        self._archive_root = archive_root
        self._scoring = scoring
        self._allowed_schemes = None if allowed_schemes is None else frozenset(allowed_schemes)

    def process(self, element: tuple[int, dict[str, str]]) -> Iterator[Any]:
        row, cells = element
        result = validate_row(row, cells, self._archive_root, self._scoring, self._allowed_schemes)
        if isinstance(result, ValidRow):
            yield KEPT, result
        else:
            Metrics.counter(self.__class__, f"rejected_{result['reason']}").inc()
            yield REJECTED, result


class RejectDuplicatePaths(beam.PTransform):
    """Keeps the first row of each file (:func:`file_identity`); later rows are rejected."""

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return (
            rows
            | "KeyByPath" >> beam.Map(lambda r: (file_identity(r.resolved_path), r))
            | "GroupByPath" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(_KeepFirstFn())
        )


def duplicate_reject(duplicate: ValidRow, first_row: int) -> dict[str, Any]:
    """The reject record of a row naming a file an earlier row (``first_row``) named."""
    return reject(
        duplicate.row,
        duplicate.dicom_path,
        "validate",
        "duplicate_path",
        f"same file as row {first_row}",
    )


class _KeepFirstFn(beam.DoFn):
    def process(self, element: tuple[str, Iterable[ValidRow]]) -> Iterator[Any]:
        _, group = element
        ordered = sorted(group, key=lambda r: r.row)
        yield KEPT, ordered[0]
        for duplicate in ordered[1:]:
            Metrics.counter(self.__class__, "rejected_duplicate_path").inc()
            yield REJECTED, duplicate_reject(duplicate, ordered[0].row)


class ReadValidRows(beam.PTransform):
    """metadata.csv -> (every row read, the valid rows of distinct files, reject records).

    The first stages of both jobs: read (one worker, streaming), spread,
    validate, pseudonymize (when a key is given: from here on every
    identifier is a pseudonym, so splits, records, rejects and shard
    placement never see the originals), and reject later rows of a file
    already listed.
    """

    def __init__(
        self,
        metadata: str,
        archive_root: str,
        allowed_schemes: Collection[str],
        required: tuple[str, ...] = md.REQUIRED_COLUMNS,
        scoring: bool = False,
        pseudonymizer: Pseudonymizer | None = None,
    ) -> None:
        super().__init__()
        self._metadata, self._archive_root = metadata, archive_root
        self._allowed_schemes, self._required = allowed_schemes, required
        self._scoring, self._pseudonymizer = scoring, pseudonymizer

    def expand(
        self, pipeline: beam.pvalue.PBegin
    ) -> tuple[beam.PCollection, beam.PCollection, beam.PCollection]:
        rows = (
            pipeline
            | "MetadataPath" >> beam.Create([self._metadata])
            | "ReadMetadata" >> beam.ParDo(ReadMetadataFn(self._required))
            | "Spread" >> beam.Reshuffle()
        )
        validate = ValidateRowFn(self._archive_root, self._scoring, self._allowed_schemes)
        valid, invalid = (
            rows | "ValidateRows" >> beam.ParDo(validate) | "RouteValidated" >> SplitOutcomes()
        )
        if self._pseudonymizer is not None:
            valid = valid | "PseudonymizeRows" >> beam.Map(self._pseudonymizer.row)
            invalid = invalid | "PseudonymizeRejects" >> beam.Map(self._pseudonymizer.record)
        unique, duplicates = (
            valid
            | "RejectDuplicatePaths" >> RejectDuplicatePaths()
            | "RouteUnique" >> SplitOutcomes()
        )
        rejects = (invalid, duplicates) | "RowRejects" >> beam.Flatten()
        return rows, unique, rejects
