"""The blocks' files -> shards, rejects file, splits.csv and, last, manifest.json (on the driver).

The same outputs as the one-graph job's writers, byte for byte: each shard
holds its records in the keyed-hash order of their rows
(:func:`~beam_pipelines.contracts.splits.order_key`) and every shard of a
split that kept a record is written; the rejects file is sorted by row; the
statistics are :class:`~beam_pipelines.transforms.preprocessing.KeptStats`'.
Memory: one compact entry per kept record (~60 bytes) to order the shards;
the rejects are merged as streams.
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
from beam_pipelines.contracts import splits
from beam_pipelines.contracts.rejects import order as reject_order
from beam_pipelines.storage.files import atomic_create, write_text
from beam_pipelines.transforms.outcomes import reject_line
from beam_pipelines.transforms.preprocessing import (
    KeptStats,
    rejects_file,
    splits_file,
    write_manifest,
)
from beam_pipelines.transforms.shards import record_shard_path, write_staged_shard


class _ShardEntries:
    """Every kept record's shard, order key and staged reference, in compact arrays."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self.shards: dict[tuple[str, int, int], int] = {}  # (split, shard, shards) -> id
        self._files: dict[str, int] = {}  # staging file -> id
        self._pending: list[tuple[int, bytes, int, int, int]] = []
        self._columns: list[np.ndarray] = []

    def add(self, summary: dict[str, Any]) -> None:
        shard = self.shards.setdefault(tuple(summary["shard"]), len(self.shards))
        path, offset, length = summary["staged"]
        file = self._files.setdefault(path, len(self._files))
        key = splits.order_key(self._seed, str(summary["row"]))
        self._pending.append((shard, key, file, offset, length))
        if len(self._pending) >= 65_536:
            self._pack()

    def _pack(self) -> None:
        if self._pending:
            self._columns.append(
                np.array(
                    self._pending,
                    dtype=[
                        ("shard", "i4"),
                        ("key", "S32"),
                        ("file", "i4"),
                        ("offset", "i8"),
                        ("length", "i8"),
                    ],
                )
            )
            self._pending = []

    def by_shard(self) -> Iterator[tuple[tuple[str, int, int], Iterator[tuple[str, int, int]]]]:
        """(shard, its staged references in record order) for every shard that has records."""
        self._pack()
        if not self._columns:
            return
        entries = np.concatenate(self._columns)
        self._columns = []
        entries = entries[np.lexsort((entries["key"], entries["shard"]))]
        shards = {number: shard for shard, number in self.shards.items()}
        files = {number: path for path, number in self._files.items()}
        bounds = np.flatnonzero(np.diff(entries["shard"])) + 1
        for group in np.split(entries, bounds):
            refs = ((files[int(e["file"])], int(e["offset"]), int(e["length"])) for e in group)
            yield shards[int(group["shard"][0])], refs


def _write_shards(out: str, entries: _ShardEntries) -> list[str]:
    written = {}
    for key, refs in entries.by_shard():
        written[key] = record_shard_path(out, *key)
        write_staged_shard(written[key], refs)
    # Every shard of a split that kept a record, even one the hash left empty.
    for split, _, shards in list(written):
        for shard in range(shards):
            if (split, shard, shards) not in written:
                written[(split, shard, shards)] = record_shard_path(out, split, shard, shards)
                write_staged_shard(written[(split, shard, shards)], [])
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
    entries = _ShardEntries(seed)
    for block in blocks:
        for summary in read_lines(summaries_file(folder, block.index)):
            accumulator = stats.add_input(accumulator, summary)
            entries.add(summary)
    shards = _write_shards(out, entries)
    rejected = _merge_rejects(out, plan, folder, blocks)
    splits_csv = write_text(splits_file(out), splits.format_splits_csv(plan.assignment))
    return write_manifest(
        plan.input_rows,
        out,
        settings,
        stats.extract_output(accumulator),
        rejected,
        shards,
        rejects_file(out),
        splits_csv,
    )
