"""Sharded, sorted, atomic writes: the one skeleton behind both jobs' output files.

Elements go to a shard by a hash of their path (so a file's content does not
depend on the runner or on bundle order); every shard of the plan is written,
even one that hashing left empty; each shard's writer sorts its elements and
writes its file atomically (temporary name, then rename). Preprocessing
writes TFRecord shards with it (:class:`WriteShards`), scoring Parquet files
(:class:`WritePredictions`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from beam_pipelines.contracts import splits
from beam_pipelines.storage import staging, tfrecord
from beam_pipelines.storage.files import atomic_create
from beam_pipelines.storage.sharding import shard_count, shard_of

#: Records per TFRecord shard when preprocessing is not given a fixed number of shards.
RECORDS_PER_SHARD = 1000
#: Prediction rows per Parquet file when scoring is not given a fixed number of files.
ROWS_PER_SHARD = 200_000


def record_shards(records: int, num_shards: int) -> int:
    """Shards for a split: the fixed number asked for, else one per RECORDS_PER_SHARD."""
    return shard_count(records, num_shards, RECORDS_PER_SHARD)


def prediction_shards(rows: int, num_shards: int) -> int:
    """Parquet files for a scoring run: the fixed number asked for, else one per ROWS_PER_SHARD."""
    return shard_count(rows, num_shards, ROWS_PER_SHARD)


def record_order(seed: int, row: int) -> bytes:
    """A record's place in its shard: a keyed hash of its metadata row (a stable shuffle)."""
    return splits.order_key(seed, str(row))


def every_record_shard(shards_per_split: dict[str, int]) -> list[tuple[str, int, int]]:
    """The key (split, shard, shards) of every shard of these splits, given their shard counts."""
    return [(split, k, shards) for split, shards in shards_per_split.items() for k in range(shards)]


def record_shard_path(out: str, split: str, shard: int, shards: int) -> str:
    """Where shard ``shard`` of ``shards`` of a split's records goes."""
    return f"{out}/{split}/part-{shard:05d}-of-{shards:05d}.tfrecord.gz"


def write_staged_shard(path: str, refs: Iterable[staging.ChunkRef]) -> int:
    """Writes a shard from staged records in the given order; returns the records written."""
    with contextlib.closing(staging.read_chunks(refs)) as chunks:
        return tfrecord.write_compressed_gz(path, chunks)


class WriteEveryShard(beam.PTransform):
    """Groups elements by shard and writes each shard of a plan, empty ones included.

    Args:
        plan: a one-element PCollection the shards follow (row counts).
        shard_key: (element, plan) -> the element's shard key.
        every_shard: plan -> the keys of every shard to write.
        write: (shard key, the shard's values) -> the written file's path.
        value: element -> what the shard's writer needs of it (default: all of it);
            only that crosses the shuffle.
    """

    def __init__(
        self,
        plan: beam.PCollection,
        shard_key: Callable[[Any, Any], Hashable],
        every_shard: Callable[[Any], Iterable[Hashable]],
        write: Callable[[Any, list[Any]], str],
        value: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__()
        self._plan, self._shard_key = plan, shard_key
        self._every_shard, self._write = every_shard, write
        self._value = value or (lambda element: element)

    def expand(self, elements: beam.PCollection) -> beam.PCollection:
        shard_key, every_shard, write = self._shard_key, self._every_shard, self._write
        value = self._value
        keyed = elements | "KeyByShard" >> beam.Map(
            lambda e, plan: (shard_key(e, plan), value(e)), pvalue.AsSingleton(self._plan)
        )
        empty = self._plan | "EveryShard" >> beam.FlatMap(
            lambda plan: [(key, None) for key in every_shard(plan)]
        )
        return (
            (keyed, empty)
            | "WithEmptyShards" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard"
            >> beam.MapTuple(lambda key, values: write(key, [v for v in values if v is not None]))
        )


class WriteShards(beam.PTransform):
    """Writes ``<out>/<split>/part-SSSSS-of-NNNNN.tfrecord.gz``, byte-identical on reruns.

    Records are ordered inside a shard by a keyed hash of their metadata row
    (a stable shuffle: an archive listed label by label would otherwise give
    shards, and so training batches, of one label at a time). Every shard of
    a split that kept a record is written. Only (row, staged chunk reference)
    pairs are grouped; the writer streams the staged records (already
    compressed by the decode stage) into the shard. Staged files are shared
    by many shards and a runner may retry or recompute a writer, so the job
    removes them after the run, not here.
    """

    def __init__(self, out: str, num_shards: int, sizes: beam.PCollection, seed: int = 0) -> None:
        """sizes: a one-element {split: rows} dict, the counts the decoder sharded by."""
        super().__init__()
        self._out, self._num_shards, self._sizes, self._seed = out, num_shards, sizes, seed

    def expand(self, summaries: beam.PCollection) -> beam.PCollection:
        out, num_shards, seed = self._out, self._num_shards, self._seed
        # The shards of the splits that kept a record, with the decoder's shard counts.
        plan = (
            summaries
            | "SplitName" >> beam.Map(lambda s: s["split"])
            | "DistinctSplits" >> beam.Distinct()
            | "KeptSplits" >> beam.combiners.ToList()
            | "ShardsPerSplit"
            >> beam.Map(
                lambda kept, sizes: {s: record_shards(sizes[s], num_shards) for s in kept},
                pvalue.AsSingleton(self._sizes),
            )
        )

        def write(key: tuple[str, int, int], values: list[tuple[int, Any]]) -> str:
            ordered = sorted((record_order(seed, row), ref) for row, ref in values)
            path = record_shard_path(out, *key)
            written = write_staged_shard(path, [ref for _, ref in ordered])
            Metrics.counter(WriteShards, f"written_{key[0]}").inc(written)
            return path

        return summaries | "Write" >> WriteEveryShard(
            plan,
            shard_key=lambda s, _: s["shard"],
            every_shard=every_record_shard,
            write=write,
            value=lambda s: (s["row"], s["staged"]),
        )


class WritePredictions(beam.PTransform):
    """Writes ``PREFIX-SSSSS-of-NNNNN.parquet``: hashed shards, rows sorted by path."""

    def __init__(
        self, prefix: str, num_shards: int, operating_point: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self._prefix, self._num_shards = prefix, num_shards
        self._operating_point = operating_point

    def expand(self, predictions: beam.PCollection) -> beam.PCollection:
        prefix, fixed, point = self._prefix, self._num_shards, self._operating_point
        total = predictions | "CountPredictions" >> beam.combiners.Count.Globally()

        def shards(count: int) -> int:
            return prediction_shards(count, fixed)

        def write(key: tuple[int, int], rows: list[dict[str, Any]]) -> str:
            import pyarrow.parquet as pq

            from beam_pipelines.contracts import predictions as contract

            shard, count = key
            rows = sorted(rows, key=lambda p: p["dicom_path"])
            columns = {name: [row.get(name) for row in rows] for name in contract.COLUMNS}
            path = f"{prefix}-{shard:05d}-of-{count:05d}.parquet"
            with atomic_create(path) as handle:
                pq.write_table(contract.to_table(columns, point), handle)
            return path

        return predictions | "Write" >> WriteEveryShard(
            total,
            shard_key=lambda p, n: (shard_of(p["dicom_path"], shards(n)), shards(n)),
            every_shard=lambda n: [(k, shards(n)) for k in range(shards(n))],
            write=write,
        )
