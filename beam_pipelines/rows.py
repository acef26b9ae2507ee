"""Reading and validating metadata.csv rows: the first stages of preprocessing and scoring.

A row becomes either a :class:`ValidRow` or a reject record; it is never
dropped. Paths are resolved against the archive root and may not escape it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import posixpath
import re
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipelines import metadata as md
from beam_pipelines.outcomes import KEPT, REJECTED

#: Columns scoring needs: the rest (labels included) may be absent.
SCORING_REQUIRED_COLUMNS: tuple[str, ...] = (md.DICOM_PATH,)

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class MetadataError(ValueError):
    """metadata.csv cannot be used at all (e.g. required columns missing)."""


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


def reject(
    row: int | None, dicom_path: str, stage: str, reason: str, detail: str
) -> dict[str, Any]:
    """Builds one reject record (the rejects/*.jsonl contract)."""
    return {
        "row": row,
        "dicom_path": dicom_path,
        "stage": stage,
        "reason": reason,
        "detail": detail,
    }


def iter_metadata(
    text: str, required: tuple[str, ...] = md.REQUIRED_COLUMNS
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yields (1-based data row, cells) for each data row of metadata.csv text.

    Tolerates a UTF-8 BOM, quoted commas and newlines; skips blank lines
    (they are not rows).

    Raises:
        MetadataError: when a required column is missing.
    """
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff"), newline=""))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in required if c not in columns]
    if missing:
        raise MetadataError(f"metadata.csv lacks required columns {missing}; it has {columns}")
    reader.fieldnames = columns
    row = 0
    for cells in reader:
        if not any((value or "").strip() for value in cells.values() if isinstance(value, str)):
            continue
        row += 1
        yield row, {k: (v if isinstance(v, str) else "") for k, v in cells.items() if k}


def archive_root_for(metadata: str, given: str | None) -> str:
    """The folder DicomPath is relative to: ``--archive_root`` or the CSV's folder."""
    root = given or (metadata.rsplit("/", 1)[0] if "/" in metadata else ".")
    return root if "://" in root else posixpath.abspath(root)


def resolve_path(archive_root: str, dicom_path: str) -> str | None:
    """Resolves a DicomPath against the archive root; None if it escapes the root.

    URIs (``gs://…``) are taken as they are. Relative paths are normalized
    lexically; ``..`` that climbs out of the root, and absolute paths outside
    it, escape.
    """
    if _URI.match(dicom_path):
        return dicom_path
    root = archive_root.rstrip("/") or "/"
    if _URI.match(root):
        joined = posixpath.normpath(posixpath.join(root.split("://", 1)[1], dicom_path))
        scheme = root.split("://", 1)[0]
        base = posixpath.normpath(root.split("://", 1)[1])
        if not (joined == base or joined.startswith(base + "/")):
            return None
        return f"{scheme}://{joined}"
    joined = posixpath.normpath(posixpath.join(root, dicom_path))
    base = posixpath.normpath(root)
    if not (joined == base or joined.startswith(base.rstrip("/") + "/")):
        return None
    return joined


def validate_row(
    row: int, cells: dict[str, str], archive_root: str, scoring: bool = False
) -> ValidRow | dict[str, Any]:
    """Validates one row; returns a ValidRow or a reject record.

    With ``scoring=True`` (scoring archives that may be unlabelled) a blank
    Abnormal cell gives ``abnormal=None`` and a blank PatientID is left for
    the DICOM header to fill; a non-blank invalid label is still rejected.
    """
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
    resolved = resolve_path(archive_root, dicom_path)
    if resolved is None:
        return reject(
            row, dicom_path, "validate", "path_escapes_root", "DicomPath leaves the archive root"
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
    """Reads metadata.csv whole on one worker and emits (row, cells).

    One sequential read keeps row numbers exact and handles quoted newlines;
    10^7 rows take about a minute, and a Reshuffle spreads the rest.
    """

    def __init__(self, required: tuple[str, ...] = md.REQUIRED_COLUMNS) -> None:
        self._required = required

    def process(self, path: str) -> Iterator[tuple[int, dict[str, str]]]:
        with FileSystems.open(path) as handle:
            text = handle.read().decode("utf-8-sig", errors="replace")
        yield from iter_metadata(text, self._required)


class ValidateRowFn(beam.DoFn):
    """Turns raw cells into (KEPT, ValidRow) or (REJECTED, reject record)."""

    def __init__(self, archive_root: str, scoring: bool = False) -> None:
        self._archive_root = archive_root
        self._scoring = scoring

    def process(self, element: tuple[int, dict[str, str]]) -> Iterator[Any]:
        row, cells = element
        result = validate_row(row, cells, self._archive_root, self._scoring)
        if isinstance(result, ValidRow):
            yield KEPT, result
        else:
            Metrics.counter(self.__class__, f"rejected_{result['reason']}").inc()
            yield REJECTED, result


class RejectDuplicatePaths(beam.PTransform):
    """Keeps the first row of each resolved path; later rows are rejected."""

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return (
            rows
            | "KeyByPath" >> beam.Map(lambda r: (r.resolved_path, r))
            | "GroupByPath" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(_KeepFirstFn())
        )


class _KeepFirstFn(beam.DoFn):
    def process(self, element: tuple[str, Iterable[ValidRow]]) -> Iterator[Any]:
        _, group = element
        ordered = sorted(group, key=lambda r: r.row)
        yield KEPT, ordered[0]
        for duplicate in ordered[1:]:
            Metrics.counter(self.__class__, "rejected_duplicate_path").inc()
            yield (
                REJECTED,
                reject(
                    duplicate.row,
                    duplicate.dicom_path,
                    "validate",
                    "duplicate_path",
                    f"same file as row {ordered[0].row}",
                ),
            )
