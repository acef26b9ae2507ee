"""Blocks of spilled rows -> staged records, and per block a summaries file and a rejects file.

One Beam pipeline whose only elements are block references: each worker
decodes its blocks row by row with the one-graph job's DoFn
(:class:`~beam_pipelines.transforms.decode.DecodeAndStageFn`) and writes
what a block yielded to two small files, in row order. Nothing that grows
with the archive crosses a stage boundary, so the runner holds nothing that
does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam import pvalue

from beam_pipelines import dicom
from beam_pipelines.blocks.row_plan import Block, read_block
from beam_pipelines.privacy import Pseudonymizer
from beam_pipelines.storage.files import open_stored, write_text
from beam_pipelines.transforms.decode import DecodeAndStageFn
from beam_pipelines.transforms.outcomes import KEPT, reject_line


def summaries_file(folder: str, block: int) -> str:
    """A block's decoded rows' summaries: JSON Lines, in row order."""
    return f"{folder}/block-{block:07d}.summaries.jsonl"


def block_rejects_file(folder: str, block: int) -> str:
    """A block's undecodable rows' reject records: JSON Lines, in row order."""
    return f"{folder}/block-{block:07d}.rejects.jsonl"


class DecodeBlockFn(DecodeAndStageFn):
    """Decodes and stages a block's rows; writes the block's summaries and rejects files."""

    def __init__(
        self,
        folder: str,
        options: dicom.DecodeOptions,
        resize_policy: dicom.ResizePolicy,
        staging_dir: str,
        num_shards: int,
        pseudonymizer: Pseudonymizer | None = None,
    ) -> None:
        super().__init__(options, resize_policy, staging_dir, num_shards, pseudonymizer)
        self._folder = folder

    def process(  # type: ignore[override]
        self, block: Block, assignment: dict[str, str], sizes: dict[str, int]
    ) -> Iterator[int]:
        summaries: list[str] = []
        rejects: list[str] = []
        for row in read_block(block):
            for tag, value in super().process(row, assignment, sizes):
                if tag == KEPT:
                    summaries.append(json.dumps(value) + "\n")
                else:
                    rejects.append(reject_line(value))
        # Written whole (atomically) by a block's worker: a retried block rewrites its own.
        write_text(summaries_file(self._folder, block.index), "".join(summaries))
        write_text(block_rejects_file(self._folder, block.index), "".join(rejects))
        yield block.index


class DecodeBlocks(beam.PTransform):
    """Decodes every block (spread over the workers); yields the indexes of the blocks done."""

    def __init__(
        self,
        blocks: list[Block],
        assignment: dict[str, str],
        sizes: dict[str, int],
        decode: DecodeBlockFn,
    ) -> None:
        super().__init__()
        self._blocks, self._assignment, self._sizes = blocks, assignment, sizes
        self._decode = decode

    def expand(self, pipeline: beam.pvalue.PBegin) -> beam.PCollection:
        assignment = pipeline | "Assignment" >> beam.Create([self._assignment])
        sizes = pipeline | "RowsPerSplit" >> beam.Create([self._sizes])
        return (
            pipeline
            | "Blocks" >> beam.Create(self._blocks)
            # Create yields its elements in one bundle: spread them over the workers.
            | "Spread" >> beam.Reshuffle()
            | "DecodeBlocks"
            >> beam.ParDo(self._decode, pvalue.AsSingleton(assignment), pvalue.AsSingleton(sizes))
        )


def read_lines(path: str) -> Iterator[dict[str, Any]]:
    """The records of a block's summaries or rejects file."""
    with open_stored(path) as handle:
        for line in handle:
            yield json.loads(line)
