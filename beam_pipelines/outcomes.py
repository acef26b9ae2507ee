"""Kept-or-rejected outcomes of a stage, and the rejects file.

Stages emit ``(KEPT, value)`` or ``(REJECTED, record)``; :class:`SplitOutcomes`
routes them. Not ``TaggedOutput``: Beam's DaskRunner (2.77) merges a ParDo's
tagged outputs into one collection, and the jobs must run there unchanged.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import apache_beam as beam

from beam_pipelines.files import write_text

KEPT = "kept"
REJECTED = "rejected"

#: Reject reason of an input a stage failed on unexpectedly (a bug, not a bad file).
INTERNAL_ERROR = "internal_error"


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

    from beam_pipelines.dicom import redact

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


class SplitOutcomes(beam.PTransform):
    """Splits (KEPT|REJECTED, value) pairs into (kept values, reject records)."""

    def expand(self, outcomes: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        kept = outcomes | "Kept" >> beam.FlatMap(lambda o: [o[1]] if o[0] == KEPT else [])
        rejected = outcomes | "Rejected" >> beam.FlatMap(
            lambda o: [o[1]] if o[0] == REJECTED else []
        )
        return kept, rejected


def _order(record: dict[str, Any]) -> tuple[bool, int, str]:
    row = record.get("row")
    return row is None, row or 0, record.get("dicom_path") or ""


class WriteRejects(beam.PTransform):
    """Writes every reject record, sorted by row then path, to one JSON Lines file.

    Rejects are few (one small dict per bad input), so one sorted file is both
    deterministic and the easiest to audit. Yields the file's path.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def expand(self, rejects: beam.PCollection) -> beam.PCollection:
        path = self._path

        def write(records: list[dict[str, Any]]) -> str:
            lines = [json.dumps(r, sort_keys=True) + "\n" for r in sorted(records, key=_order)]
            return write_text(path, "".join(lines))

        return rejects | "AllRejects" >> beam.combiners.ToList() | "WriteJsonl" >> beam.Map(write)


class Progress:
    """Logs a worker's progress now and then (every ``every`` seconds), never per element.

    Beam counters are only reported at the end by the local runners; this
    keeps long stages visibly alive in the worker logs.
    """

    def __init__(self, what: str, every: float = 30.0) -> None:
        self._what, self._every = what, every
        self._count = 0
        self._start = self._last = 0.0

    def tick(self) -> None:
        """Counts one element; logs when ``every`` seconds have passed since the last line."""
        import time

        now = time.monotonic()
        if not self._count:
            self._start = self._last = now
        self._count += 1
        if now - self._last >= self._every:
            self._last = now
            rate = self._count / max(now - self._start, 1e-9)
            logging.getLogger(__name__).info(
                "%s: %d so far in this worker (%.1f/s)", self._what, self._count, rate
            )
