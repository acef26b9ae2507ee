"""The blocks' files -> shards, the rejects file and, last, manifest.json (on the driver).

The same outputs as the one-graph job's writers, byte for byte: each shard
holds its records in :func:`~beam_pipelines.transforms.shards.record_order`
and every shard of a split that kept a record is written
(:func:`~beam_pipelines.transforms.shards.every_record_shard`); the rejects
file is sorted by row; the statistics are
:class:`~beam_pipelines.transforms.preprocessing.KeptStats`'. Memory: one
56-byte entry per kept record, sorted in place, orders the shards; the
rejects are merged as streams. (splits.csv was written with the plan.)
"""

from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from beam_pipelines.blocks.decode import block_rejects_file, read_lines, summaries_file
from beam_pipelines.blocks.row_plan import Block, RowPlan
from beam_pipelines.contracts.rejects import order as reject_order
from beam_pipelines.storage.files import atomic_create
from beam_pipelines.transforms.outcomes import reject_line
from beam_pipelines.transforms.preprocessing import (
    KeptStats,
    rejects_file,
    splits_file,
    write_manifest,
)
from beam_pipelines.transforms.shards import (
    every_record_shard,
    record_order,
    record_shard_path,
    write_staged_shard,
)

_ENTRY = np.dtype(
    [("shard", "i4"), ("key", "S32"), ("file", "i4"), ("offset", "i8"), ("length", "i8")]
)


class _ShardEntries:
    """Every kept record's shard, order key and staged reference, in one compact array."""

    def __init__(self, seed: int, capacity: int) -> None:
        self._seed = seed
        self._shards: dict[tuple[str, int, int], int] = {}  # (split, shard, shards) -> id
        self._files: dict[str, int] = {}  # staging file -> id
        self._entries = np.empty(capacity, _ENTRY)
        self._count = 0

    def add(self, summary: dict[str, Any]) -> None:
        shard = self._shards.setdefault(tuple(summary["shard"]), len(self._shards))
        path, offset, length = summary["staged"]
        file = self._files.setdefault(path, len(self._files))
        key = record_order(self._seed, summary["row"])
        self._entries[self._count] = (shard, key, file, offset, length)
        self._count += 1

    def by_shard(self) -> Iterator[tuple[tuple[str, int, int], Iterator[tuple[str, int, int]]]]:
        """(shard, its staged references in record order) for every shard that has records."""
        entries = self._entries[: self._count]
        entries.sort(order=["shard", "key"])  # in place: no second copy of the entries
        shards = {number: shard for shard, number in self._shards.items()}
        files = {number: path for path, number in self._files.items()}
        for group in np.split(entries, np.flatnonzero(np.diff(entries["shard"])) + 1):
            if len(group):
                refs = ((files[int(e["file"])], int(e["offset"]), int(e["length"])) for e in group)
                yield shards[int(group["shard"][0])], refs


def _write_shards(out: str, entries: _ShardEntries) -> list[str]:
    written: dict[tuple[str, int, int], str] = {}
    for key, refs in entries.by_shard():
        written[key] = record_shard_path(out, *key)
        write_staged_shard(written[key], refs)
    # Every shard of a split that kept a record, even one the hash left empty.
    for key in every_record_shard({split: shards for split, _, shards in written}):
        if key not in written:
            written[key] = record_shard_path(out, *key)
            write_staged_shard(written[key], [])
    return sorted(written.values())


def _merge_rejects(out: str, plan: RowPlan, folder: str, blocks: list[Block]) -> dict[str, int]:
    """Writes the rejects file from the rows' and the blocks' rejects; returns counts by reason."""
    # Each stream is in row order: the rows' own rejects, and the blocks' (blocks follow rows).
    undecodable = itertools.chain.from_iterable(
        read_lines(block_rejects_file(folder, block.index)) for block in blocks
    )
    counts: collections.Counter[str] = collections.Counter()
    with atomic_create(rejects_file(out)) as handle:
        for record in heapq.merge(read_lines(plan.row_rejects), undecodable, key=reject_order):
            counts[record["reason"]] += 1
            handle.write(reject_line(record).encode("utf-8"))
    return dict(counts)


def finish(
    out: str,
    plan: RowPlan,
    folder: str,
    blocks: list[Block],
    seed: int,
    settings: dict[str, Any],
) -> str:
    """Writes the job's outputs from the blocks' files; returns the manifest's path."""
    stats = KeptStats()
    accumulator = stats.create_accumulator()
    entries = _ShardEntries(seed, plan.kept_rows)
    for block in blocks:
        for summary in read_lines(summaries_file(folder, block.index)):
            accumulator = stats.add_input(accumulator, summary)
            entries.add(summary)
    shards = _write_shards(out, entries)
    rejected = _merge_rejects(out, plan, folder, blocks)
    return write_manifest(
        plan.input_rows,
        out,
        settings,
        stats.extract_output(accumulator),
        rejected,
        shards,
        rejects_file(out),
        splits_file(out),
    )
