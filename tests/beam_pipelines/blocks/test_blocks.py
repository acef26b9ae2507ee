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
from beam_pipelines.blocks.decode import check_done
from beam_pipelines.blocks.row_plan import RowPlan, plan_rows, read_block
from beam_pipelines.contracts.splits import SPLITS
from beam_pipelines.options import is_local_runner
from tests.support.files import output_files
from tests.support.runners import LOCAL_RUNNER

MULTI_PROCESS = [
    "--runner=FnApiRunner",
    "--direct_running_mode=multi_processing",
    "--direct_num_workers=2",
]


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
    assert output_files(tmp_path / "blocks") == output_files(tmp_path / "graph")
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
        str(root / "splits.csv"),
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
    # splits.csv names patients, split sizes count rows; each kept row carries its split.
    assigned = dict(line.split(",") for line in (tmp_path / "splits.csv").read_text().split()[1:])
    assert sorted(assigned) == ["P1", "P3"] and sum(plan.sizes.values()) == 3
    carried = [SPLITS[code] for block in plan.blocks(workers=2) for code in block.splits]
    assert carried == [assigned[row.patient_id] for row in kept]


def test_blocks_cover_every_row_once_in_order_and_stay_small() -> None:
    def cut(rows: int, workers: int) -> list[tuple[int, int]]:
        offsets = array.array("q", range(0, 10 * rows + 1, 10))
        plan = RowPlan(rows, "", {}, "spill", offsets, bytes(rows))
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


def test_a_block_that_never_came_back_fails_the_job(tmp_path: Path) -> None:
    plan = RowPlan(3, "", {}, "spill", array.array("q", [0, 1, 2, 3]), bytes(3))
    blocks = plan.blocks(workers=1)
    (tmp_path / "done.json").write_text(json.dumps([0, 2]))
    with pytest.raises(RuntimeError, match=r"1 of 3 blocks were not decoded \(1\)"):
        check_done(str(tmp_path), blocks)
    (tmp_path / "done.json").write_text(json.dumps([2, 0, 1]))
    check_done(str(tmp_path), blocks)


@pytest.mark.parametrize(
    ("runner", "local"),
    [
        ("FnApiRunner", True),
        ("fnapi", True),
        ("direct", True),
        ("DirectRunner", True),
        ("apache_beam.runners.portability.fn_api_runner.FnApiRunner", True),
        ("PrismRunner", True),
        ("DaskRunner", False),
        ("FlinkRunner", False),
        ("DataflowRunner", False),
    ],
)
def test_blocks_are_the_default_on_every_name_of_a_local_runner(runner: str, local: bool) -> None:
    from apache_beam.options.pipeline_options import PipelineOptions

    assert is_local_runner(PipelineOptions([f"--runner={runner}"])) is local
