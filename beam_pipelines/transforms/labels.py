"""The labels join of ``xray-index``: a labels CSV -> each image's Abnormal, in the pipeline.

The CSV is read on one worker, streaming (the metadata reading rules), and
joined to the index rows by a key column with ``CoGroupByKey``: no side of
the join is ever held whole by the driver or one worker. A key's label is the
one value its rows agree on. Labels rows that give no image a label go to
unmatched_labels.csv with their reason
(:data:`~beam_pipelines.contracts.index.UNMATCHED_REASONS`); an image
without a label keeps an empty Abnormal.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam

from beam_pipelines.contracts import index as ix
from beam_pipelines.contracts import metadata as md
from beam_pipelines.transforms.outcomes import KEPT, tagged
from beam_pipelines.transforms.rows import read_metadata

UNMATCHED = "unmatched"


class ReadLabelsFn(beam.DoFn):
    """labels.csv -> (key value, (row, label cell)) or (None, (row, reason)) for a bad row."""

    def __init__(self, key: str, column: str) -> None:
        self._key, self._column = key, column

    def process(self, path: str) -> Iterator[tuple[str | None, tuple[int, str]]]:
        for row, cells in read_metadata(path, (self._key, self._column)):
            if md.problem(cells):
                yield None, (row, "unreadable_row")
                continue
            key = (cells.get(self._key) or "").strip()
            if not key:
                yield None, (row, "blank_key")
            else:
                yield key, (row, cells.get(self._column) or "")


def join_key(element: tuple[str, dict[str, Any]]) -> Iterator[tuple[str, Any]]:
    """One key's images and labels rows -> (KEPT, cells) and (UNMATCHED, (row, key, why))."""
    key, group = element
    labels = sorted(group["labels"])
    parsed = [(row, md.parse_label(raw)) for row, raw in labels]
    values = {value for _, value in parsed if value is not None}
    label = next(iter(values)) if len(values) == 1 else None
    images = list(group["images"])
    for row, value in parsed:
        if value is None:
            yield UNMATCHED, (row, key, "bad_value")
        elif len(values) > 1:
            yield UNMATCHED, (row, key, "conflicting_value")
        elif not images:
            yield UNMATCHED, (row, key, "no_image")
    for cells in images:
        yield KEPT, {**cells, md.ABNORMAL: "" if label is None else md.format_label(label)}


class JoinLabels(beam.PTransform):
    """(rows, labels CSV path) -> (rows with Abnormal filled where a label matched, unmatched).

    Unmatched are ``(labels row, key, reason)`` tuples; rows whose key cell is
    blank are never joined (they stay unlabelled).
    """

    def __init__(self, path: str, key: str, column: str) -> None:
        super().__init__()
        if key not in ix.LABEL_KEYS:
            raise ValueError(f"labels key must be one of {ix.LABEL_KEYS}, not {key!r}")
        self._path, self._key, self._column = path, key, column

    def expand(self, rows: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        key = self._key
        read = (
            rows.pipeline
            | "LabelsPath" >> beam.Create([self._path])
            | "ReadLabels" >> beam.ParDo(ReadLabelsFn(key, self._column))
            | "SpreadLabels" >> beam.Reshuffle()
        )
        bad = read | "BadRows" >> beam.FlatMap(
            lambda kv: [(kv[1][0], "", kv[1][1])] if kv[0] is None else []
        )
        labels = read | "KeyedLabels" >> beam.Filter(lambda kv: kv[0] is not None)
        blank = rows | "NoKey" >> beam.Filter(lambda cells: not cells[key])
        keyed = rows | "KeyImages" >> beam.FlatMap(
            lambda cells: [(cells[key], cells)] if cells[key] else []
        )
        joined = (
            {"images": keyed, "labels": labels}
            | "Join" >> beam.CoGroupByKey()
            | "LabelImages" >> beam.FlatMap(join_key)
        )
        labelled = joined | "Labelled" >> beam.FlatMap(tagged(KEPT))
        unmatched = joined | "Unmatched" >> beam.FlatMap(tagged(UNMATCHED))
        all_rows = (labelled, blank) | "AllRows" >> beam.Flatten()
        return all_rows, (unmatched, bad) | "AllUnmatched" >> beam.Flatten()


def unmatched_line(item: tuple[int, str, str]) -> tuple[tuple[int, str], str]:
    """(sort key, unmatched_labels.csv line) of one unmatched labels row."""
    row, key, reason = item
    return (row, reason), md.format_row([str(row), md.clean_cell(key), reason])


def labelled_key(cells: dict[str, str]) -> str:
    """The count an output row adds to: labelled or unlabelled."""
    return ix.LABELLED if cells[md.ABNORMAL] else ix.UNLABELLED
