"""The rejects contract: one JSON object per input that did not make it, with its reason.

Every job writes ``rejects/*.jsonl`` records built here, sorted by metadata
row (inputs without a row last, by path): ``row`` (1-based data row of
metadata.csv, or null), ``dicom_path``, ``stage`` (``validate``, ``decode``,
``read_shard``, ``score``, ``results``: the scorer's Structured Report of a
scored image was not stored), ``reason`` (a stable code) and ``detail`` (a
human explanation free of header values).
"""

from __future__ import annotations

import logging
from typing import Any

#: Reject reasons of the row-reading and validation stage (stage ``validate``).
VALIDATE_REASONS: tuple[str, ...] = (
    "bad_encoding",
    "malformed_row",
    "ragged_row",
    "missing_path",
    "missing_patient_id",
    "bad_label",
    "scheme_not_allowed",
    "path_escapes_root",
    "duplicate_path",
)

#: Reject reason of an input a stage failed on unexpectedly (a bug, not a bad file).
INTERNAL_ERROR = "internal_error"


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


def order(record: dict[str, Any]) -> tuple[bool, int, str]:
    """The file's order: by metadata row, rows before inputs without one, then by path."""
    row = record.get("row")
    return row is None, row or 0, record.get("dicom_path") or ""


def internal_error_detail(exc: Exception, stage: str, row: int | None) -> str:
    """Logs an unexpected exception on one input and returns its reject detail.

    A decoder bug on one file must not fail a job over millions: the input
    becomes an ``internal_error`` reject instead. The detail and the log line
    hold the exception's type and its message with quoted values redacted
    (they may be header values, i.e. PHI); the log adds the traceback's frames
    (code locations only) and the metadata row, never the path, which can
    carry a patient's name. Callers let ``MemoryError`` (the worker's
    problem, not the input's) and non-``Exception`` errors propagate.
    """
    import traceback

    from beam_pipelines.privacy import redact

    detail = f"{type(exc).__name__}: {redact(exc)}"
    frames = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
    logging.getLogger(__name__).warning(
        "%s stage: unexpected error on metadata row %s, rejected as %s: %s\n%s",
        stage,
        "(none)" if row is None else row,
        INTERNAL_ERROR,
        detail,
        frames,
    )
    return detail
