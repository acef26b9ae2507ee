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

from beam_pipelines import dicom
from beam_pipelines.blocks.row_plan import Block, read_block
from beam_pipelines.contracts.splits import SPLITS
from beam_pipelines.privacy import Pseudonymizer
from beam_pipelines.storage.files import open_stored, read_bytes, write_text
from beam_pipelines.transforms.decode import DecodeAndStageFn
from beam_pipelines.transforms.outcomes import KEPT, reject_line


def summaries_file(folder: str, block: int) -> str:
    """A block's decoded rows' summaries: JSON Lines, in row order."""
    return f"{folder}/block-{block:07d}.summaries.jsonl"


def block_rejects_file(folder: str, block: int) -> str:
    """A block's undecodable rows' reject records: JSON Lines, in row order."""
    return f"{folder}/block-{block:07d}.rejects.jsonl"


def done_file(folder: str) -> str:
    """The indexes of the blocks the pipeline decoded (JSON), for the driver to check."""
    return f"{folder}/done.json"


class DecodeBlockFn(DecodeAndStageFn):
    """Decodes and stages a block's rows; writes the block's summaries and rejects files.

    ``sizes`` ({split: rows}) fixes each split's shard count; each row's split
    comes with its block.
    """

    def __init__(
        self,
        folder: str,
        sizes: dict[str, int],
        options: dicom.DecodeOptions,
        resize_policy: dicom.ResizePolicy,
        staging_dir: str,
        num_shards: int,
        pseudonymizer: Pseudonymizer | None = None,
    ) -> None:
        super().__init__(options, resize_policy, staging_dir, num_shards, pseudonymizer)
        self.folder, self._sizes = folder, sizes

    def process(self, block: Block) -> Iterator[int]:  # type: ignore[override]
        summaries: list[str] = []
        rejects: list[str] = []
        for row, split in zip(read_block(block), block.splits, strict=True):
            for tag, value in self.decode_row(row, SPLITS[split], self._sizes):
                if tag == KEPT:
                    summaries.append(json.dumps(value) + "\n")
                else:
                    rejects.append(reject_line(value))
        # Written whole (atomically) by a block's worker: a retried block rewrites its own.
        write_text(summaries_file(self.folder, block.index), "".join(summaries))
        write_text(block_rejects_file(self.folder, block.index), "".join(rejects))
        yield block.index


class DecodeBlocks(beam.PTransform):
    """Decodes every block, spread over the workers; writes :func:`done_file` last.

    The driver reads the indexes back (:func:`check_done`): a block that never
    came back fails the job. Collecting them also makes Beam's local runner
    notice a worker that died (with nothing downstream, it waited forever).
    """

    def __init__(self, blocks: list[Block], decode: DecodeBlockFn) -> None:
        super().__init__()
        self._blocks, self._decode = blocks, decode

    def expand(self, pipeline: beam.pvalue.PBegin) -> beam.PCollection:
        path = done_file(self._decode.folder)
        return (
            pipeline
            | "Blocks" >> beam.Create(self._blocks)  # reshuffled: spread over the workers
            | "DecodeBlocks" >> beam.ParDo(self._decode)
            | "AllDone" >> beam.combiners.ToList()
            | "WriteDone" >> beam.Map(lambda done: write_text(path, json.dumps(sorted(done))))
        )


def check_done(folder: str, blocks: list[Block]) -> None:
    """Raises RuntimeError unless the pipeline reported every block decoded."""
    done = set(json.loads(read_bytes(done_file(folder)))) if blocks else set()
    missing = sorted({block.index for block in blocks} - done)
    if missing:
        shown = ", ".join(map(str, missing[:5]))
        raise RuntimeError(f"{len(missing)} of {len(blocks)} blocks were not decoded ({shown})")


def read_lines(path: str) -> Iterator[dict[str, Any]]:
    """The records of a block's summaries or rejects file."""
    with open_stored(path) as handle:
        for line in handle:
            yield json.loads(line)
