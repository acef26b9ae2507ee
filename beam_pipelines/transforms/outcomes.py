"""Kept-or-rejected outcomes of a stage, and the rejects file.

Stages emit ``(KEPT, value)`` or ``(REJECTED, record)``; :class:`SplitOutcomes`
routes them. Not ``TaggedOutput``: Beam's DaskRunner (2.77) merges a ParDo's
tagged outputs into one collection, and the jobs must run there unchanged.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import apache_beam as beam

from beam_pipelines.contracts.rejects import order as reject_order
from beam_pipelines.storage.files import write_text
from beam_pipelines.transforms.ordered import concatenate_parts

KEPT = "kept"
REJECTED = "rejected"


def tagged(tag: str) -> Callable[[tuple[str, Any]], list[Any]]:
    """For ``beam.FlatMap``: the value of a ``(tag, value)`` outcome with this tag, else nothing."""
    return lambda outcome: [outcome[1]] if outcome[0] == tag else []


class SplitOutcomes(beam.PTransform):
    """Splits (KEPT|REJECTED, value) pairs into (kept values, reject records)."""

    def expand(self, outcomes: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        kept = outcomes | "Kept" >> beam.FlatMap(tagged(KEPT))
        rejected = outcomes | "Rejected" >> beam.FlatMap(tagged(REJECTED))
        return kept, rejected


class CountByReason(beam.PTransform):
    """Reject records -> one {reason: count} dict (empty when nothing was rejected)."""

    def expand(self, rejects: beam.PCollection) -> beam.PCollection:
        return (
            rejects
            | "Reason" >> beam.Map(lambda r: r["reason"])
            | "Count" >> beam.combiners.Count.PerElement()
            | "ToDict" >> beam.combiners.ToDict()
        )


def reject_line(record: dict[str, Any]) -> str:
    """One line of the rejects file."""
    return json.dumps(record, sort_keys=True) + "\n"


#: Rejects are grouped by blocks of this many metadata rows: no worker ever
#: holds more than one block's rejects, however many the archive has.
REJECT_BLOCK_ROWS = 100_000
# Rejects without a row (none today) sort after every row, as in the contract's order.
_NO_ROW_BLOCK = 2**62


def _block(record: dict[str, Any], block_rows: int) -> int:
    row = record.get("row")
    return _NO_ROW_BLOCK if row is None else row // block_rows


class WriteRejects(beam.PTransform):
    """Writes every reject record, sorted by row then path, to one JSON Lines file.

    One sorted file is both deterministic and the easiest to audit. Rejects
    are grouped and sorted by blocks of :data:`REJECT_BLOCK_ROWS` rows, each
    block written to a part file; one step then streams the parts, in block
    order, into the file (atomically). So a worker holds at most one block of
    rejects, not all of them (an archive of 10^7 files with a fifth of
    non-image objects has 2 x 10^6). Yields the file's path. The job removes
    the parts (:func:`~beam_pipelines.transforms.ordered.part_pattern`) after
    the run: deleting them in the step would make a retried step fail.
    """

    def __init__(self, path: str, block_rows: int = REJECT_BLOCK_ROWS) -> None:
        super().__init__()
        self._path, self._block_rows = path, block_rows

    def expand(self, rejects: beam.PCollection) -> beam.PCollection:
        path, block_rows = self._path, self._block_rows

        def write_block(element: tuple[int, Iterable[dict[str, Any]]]) -> tuple[int, str]:
            block, records = element
            lines = [reject_line(r) for r in sorted(records, key=reject_order)]
            return block, write_text(f"{path}.part-{block:019d}", "".join(lines))

        def concatenate(target: str, parts: list[tuple[int, str]]) -> str:
            # Part names sort in block order (zero-padded numbers).
            concatenate_parts(target, "", [part for _, part in parts])
            return target

        parts = (
            rejects
            | "KeyByBlock" >> beam.Map(lambda r: (_block(r, block_rows), r))
            | "GroupByBlock" >> beam.GroupByKey()
            | "WriteBlocks" >> beam.Map(write_block)
        )
        return (
            rejects.pipeline
            | "RejectsPath" >> beam.Create([path])
            | "Concatenate" >> beam.Map(concatenate, beam.pvalue.AsList(parts))
        )


class Progress:
    """A worker's progress: for the driver's bar, and in the log now and then, never per element.

    Beam counters are only reported at the end by the local runners; this
    keeps long stages visibly alive: the count goes to the driver's progress
    folder (:func:`beam_pipelines.console.count`) every ``report`` seconds and
    at :meth:`flush`, and a log line is written every ``every`` seconds.
    ``bar=False``: the log lines only (a later stage over the same images
    would count them twice on the bar).
    """

    def __init__(
        self, what: str, every: float = 30.0, report: float = 0.5, bar: bool = True
    ) -> None:
        self._what, self._every, self._report, self._bar = what, every, report, bar
        self._count = 0
        self._start = self._last = self._reported = 0.0
        # Unique for the run: a later instance at a reused address must not overwrite this count.
        self._key = uuid.uuid4().hex

    def tick(self) -> None:
        """Counts one element; reports and logs when their intervals have passed."""
        import time

        now = time.monotonic()
        if not self._count:
            self._start = self._last = self._reported = now
        self._count += 1
        if now - self._reported >= self._report:
            self.flush()
            self._reported = now
        if now - self._last >= self._every:
            self._last = now
            rate = self._count / max(now - self._start, 1e-9)
            logging.getLogger(__name__).info(
                "%s: %d so far in this worker (%.1f/s)", self._what, self._count, rate
            )

    def flush(self) -> None:
        """Reports the count so far to the driver's progress bar (when it has one)."""
        if not self._bar:
            return
        from beam_pipelines.console import count

        count(self._key, self._count)
