"""Preprocessing in blocks: the same bytes as the one-graph job, rows planned in one pass."""

from __future__ import annotations

import array
import json
import logging
import os
from pathlib import Path

import pytest

from beam_pipelines import preprocess
from beam_pipelines.blocks import row_plan
from beam_pipelines.blocks.row_plan import RowPlan, plan_rows, read_block
from tests.support.files import is_job_log
from tests.support.runners import LOCAL_RUNNER

MULTI_PROCESS = [
    "--runner=FnApiRunner",
    "--direct_running_mode=multi_processing",
    "--direct_num_workers=2",
]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(".lock") and not is_job_log(p)
    }


@pytest.mark.slow
def test_blocks_write_the_bytes_the_one_graph_job_writes(
    synthetic_archive: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=row_plan.__name__)
    key = tmp_path / "key"
    key.write_bytes(b"a key of at least sixteen bytes")
    common = [
        "--metadata",
        str(synthetic_archive / "metadata.csv"),
        "--num_shards",
        "3",
        "--pseudonymize_key_file",
        str(key),
    ]
    graph = preprocess.run(
        [*common, "--output_dir", str(tmp_path / "graph"), "--blocks", "off", *LOCAL_RUNNER]
    )
    assert not [r for r in caplog.records if r.name == row_plan.__name__]
    # The default on the local runner; two workers share the blocks.
    blocks = preprocess.run([*common, "--output_dir", str(tmp_path / "blocks"), *MULTI_PROCESS])
    [planned] = [r.getMessage() for r in caplog.records if r.name == row_plan.__name__]
    assert planned.startswith(f"Read {graph['input_rows']} rows")
    assert blocks == graph
    assert graph["rejected"] == 8 and len(graph["rejected_by_reason"]) == 8
    assert _files(tmp_path / "blocks") == _files(tmp_path / "graph")
    # Nothing of the blocks' work files is left.
    assert not list((tmp_path / "blocks").glob(".*"))


def _plan(root: Path, lines: list[str]) -> RowPlan:
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return plan_rows(
        str(root / "metadata.csv"),
        str(root),
        set(),
        None,
        (0.8, 0.1, 0.1),
        0,
        {},
        str(root / "work"),
    )


def test_one_pass_keeps_first_rows_spills_them_and_writes_rejects_in_row_order(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.dcm").write_bytes(b"x")
    os.symlink(tmp_path / "a.dcm", tmp_path / "link.dcm")
    plan = _plan(
        tmp_path,
        [
            "PatientID,DicomPath,Abnormal",
            "P1,a.dcm,1",
            "P2,b.dcm,maybe",
            "P2,link.dcm,0",  # the same file as row 1, through a symlink
            ",c.dcm,0",
            "P3,c.dcm,0",
            "P1,d.dcm,0",
        ],
    )
    assert plan.input_rows == 6 and plan.kept_rows == 3
    kept = [row for block in plan.blocks(workers=2) for row in read_block(block)]
    assert [(r.row, r.patient_id, r.dicom_path) for r in kept] == [
        (1, "P1", "a.dcm"),
        (5, "P3", "c.dcm"),
        (6, "P1", "d.dcm"),
    ]
    rejects = [json.loads(line) for line in Path(plan.row_rejects).read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in rejects] == [
        (2, "bad_label"),
        (3, "duplicate_path"),
        (4, "missing_patient_id"),
    ]
    assert rejects[1]["detail"] == "same file as row 1"
    # Split sizes count rows, the assignment patients (P1 is abnormal through row 1).
    assert sorted(plan.assignment) == ["P1", "P3"] and sum(plan.sizes.values()) == 3


def test_blocks_cover_every_row_once_in_order_and_stay_small() -> None:
    def cut(rows: int, workers: int) -> list[tuple[int, int]]:
        offsets = array.array("q", range(0, 10 * rows + 1, 10))
        plan = RowPlan(rows, "", {}, {}, "spill", offsets)
        return [(b.start, b.end) for b in plan.blocks(workers)]

    assert cut(0, 2) == []
    assert cut(3, 2) == [(0, 10), (10, 20), (20, 30)]
    for rows, workers in ((17, 1), (1000, 2), (250_000, 2)):
        blocks = cut(rows, workers)
        assert blocks[0][0] == 0 and blocks[-1][1] == 10 * rows
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
        assert max(end - start for start, end in blocks) <= 10 * row_plan.MAX_BLOCK_ROWS
        # Enough blocks to even out the workers' shares.
        assert len(blocks) > min(rows, workers * row_plan.BLOCKS_PER_WORKER) / 2
