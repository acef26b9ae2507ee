"""The driver's one pass over metadata.csv: every row validated, the kept ones spilled, a plan.

What the one-graph job does with shuffles (:class:`~beam_pipelines.transforms.rows.ReadValidRows`
and :class:`~beam_pipelines.transforms.preprocessing.AssignSplits`), done
here while streaming the rows, with the same functions: validate,
pseudonymize, reject later rows of a file already listed, sum up each
patient, assign the splits. What is held grows with the archive only in
compact form: a 16-byte digest and a row number per distinct file, one
small summary per patient, an 8-byte offset per kept row. The kept rows are
spilled to one file and the rejects written as they come, both in row
order.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import io
import logging
import math
import pickle
from collections.abc import Collection, Iterator

import numpy as np

from beam_pipelines.console import announce_total
from beam_pipelines.contracts import splits
from beam_pipelines.contracts.splits import SPLITS
from beam_pipelines.privacy import Pseudonymizer
from beam_pipelines.storage.files import atomic_create, open_stored, write_text
from beam_pipelines.storage.paths import file_identity
from beam_pipelines.transforms.outcomes import reject_line
from beam_pipelines.transforms.preprocessing import (
    any_abnormal_and_rows,
    patient_rows,
    plan_splits,
)
from beam_pipelines.transforms.rows import ValidRow, duplicate_reject, read_metadata, validate_row

logger = logging.getLogger(__name__)

#: Most rows in one block: a worker holds one block's summaries at a time.
MAX_BLOCK_ROWS = 1000
#: Blocks per worker at least (when rows allow): small blocks even out the workers' shares.
BLOCKS_PER_WORKER = 8


@dataclasses.dataclass(frozen=True)
class Block:
    """Bytes [start, end) of the spill: the pickled kept rows a worker decodes as one unit.

    ``splits`` holds each of those rows' split (an index into ``SPLITS``): a
    block carries what its rows need, so no worker holds the whole assignment.
    """

    index: int
    spill: str
    start: int
    end: int
    splits: bytes


@dataclasses.dataclass
class RowPlan:
    """What the pass over the rows found: counts, the rows' rejects, split sizes, the spill."""

    input_rows: int
    row_rejects: str
    sizes: dict[str, int]
    spill: str
    offsets: array.array  # where each kept row starts in the spill, then where the spill ends
    row_splits: bytes  # each kept row's split, an index into SPLITS

    @property
    def kept_rows(self) -> int:
        return len(self.offsets) - 1

    def blocks(self, workers: int) -> list[Block]:
        """The spill cut into blocks: about BLOCKS_PER_WORKER per worker, MAX_BLOCK_ROWS at most."""
        wanted = max(1, workers) * BLOCKS_PER_WORKER
        size = min(MAX_BLOCK_ROWS, max(1, math.ceil(self.kept_rows / wanted)))
        starts = range(0, self.kept_rows, size)
        ends = [min(first + size, self.kept_rows) for first in starts]
        return [
            Block(
                index,
                self.spill,
                self.offsets[first],
                self.offsets[end],
                self.row_splits[first:end],
            )
            for index, (first, end) in enumerate(zip(starts, ends, strict=True))
        ]


def _digest(row: ValidRow) -> bytes:
    # 128 bits: two different files collide with odds ~n^2/2^129, nil for any archive.
    identity = file_identity(row.resolved_path).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(identity, digest_size=16).digest()


def plan_rows(
    metadata: str,
    archive_root: str,
    allowed_schemes: Collection[str],
    pseudonymizer: Pseudonymizer | None,
    ratios: tuple[float, float, float],
    seed: int,
    pinned: dict[str, str],
    folder: str,
    splits_csv: str,
) -> RowPlan:
    """Reads every row once; spills the kept ones, writes the rejects and ``splits_csv``."""
    first_rows: dict[bytes, int] = {}  # file digest -> the first row naming it
    patients: dict[str, int] = {}  # PatientID -> its index in summaries
    summaries: list[tuple[bool, int]] = []  # (abnormal, rows) of each patient
    row_patients = array.array("i")  # each kept row's patient index
    offsets = array.array("q", [0])
    spill, row_rejects = f"{folder}/rows.pickles", f"{folder}/row_rejects.jsonl"
    row_number = rejected = 0
    with atomic_create(spill) as spilled, atomic_create(row_rejects) as rejects:
        for row_number, cells in read_metadata(metadata):  # noqa: B007
            result = validate_row(row_number, cells, archive_root, False, allowed_schemes)
            if isinstance(result, dict):
                record = pseudonymizer.record(result) if pseudonymizer else result
                rejects.write(reject_line(record).encode("utf-8"))
                rejected += 1
                continue
            row = pseudonymizer.row(result) if pseudonymizer else result
            first = first_rows.setdefault(_digest(row), row.row)
            if first != row.row:
                rejects.write(reject_line(duplicate_reject(row, first)).encode("utf-8"))
                rejected += 1
                continue
            patient, summary = patient_rows(row)
            index = patients.setdefault(patient, len(summaries))
            if index == len(summaries):
                summaries.append((False, 0))
            summaries[index] = any_abnormal_and_rows((summaries[index], summary))
            row_patients.append(index)
            data = pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)
            spilled.write(data)
            offsets.append(offsets[-1] + len(data))
    announce_total(row_number)
    del first_rows  # not needed past the pass; may be the largest thing held
    plan = plan_splits(
        ((patient, summaries[index]) for patient, index in patients.items()), ratios, seed, pinned
    )
    write_text(splits_csv, splits.format_splits_csv(plan["assignment"]))
    # Patients in index order (the dict's insertion order) -> their split's index.
    codes = np.frombuffer(bytes(SPLITS.index(plan["assignment"][p]) for p in patients), np.uint8)
    row_splits = codes[np.frombuffer(row_patients, np.int32)].tobytes() if row_patients else b""
    logger.info(
        "Read %d rows: %d to decode (%d patients), %d rejected",
        row_number,
        len(offsets) - 1,
        len(patients),
        rejected,
    )
    return RowPlan(row_number, row_rejects, plan["rows"], spill, offsets, row_splits)


def read_block(block: Block) -> Iterator[ValidRow]:
    """The kept rows of a block, in row order."""
    with open_stored(block.spill) as handle:
        handle.seek(block.start)
        data = io.BytesIO(handle.read(block.end - block.start))
    while data.tell() < block.end - block.start:
        yield pickle.load(data)
