"""beam_pipelines.transforms.outcomes: kept or rejected routed; the rejects file, by blocks."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines.contracts.rejects import reject
from beam_pipelines.storage.files import remove_matching
from beam_pipelines.transforms.ordered import part_pattern
from beam_pipelines.transforms.outcomes import (
    KEPT,
    REJECTED,
    CountByReason,
    Progress,
    SplitOutcomes,
    WriteRejects,
)


def test_split_outcomes_routes_kept_values_and_reject_records() -> None:
    outcomes = [
        (KEPT, ("a.dcm", 1)),
        (REJECTED, reject(2, "b.dcm", "decode", "not_dicom", "")),
        (KEPT, ("c.dcm", 3)),
        (REJECTED, reject(4, "d.dcm", "validate", "bad_label", "")),
    ]
    with TestPipeline() as pipeline:
        kept, rejected = pipeline | beam.Create(outcomes) | SplitOutcomes()
        assert_that(kept, equal_to([("a.dcm", 1), ("c.dcm", 3)]), label="kept")
        assert_that(
            rejected | beam.Map(lambda r: (r["row"], r["reason"])),
            equal_to([(2, "not_dicom"), (4, "bad_label")]),
            label="rejected",
        )


def _write(tmp_path: Path, records: list[dict], block_rows: int) -> list[dict]:
    target = tmp_path / "rejects" / "rejects.jsonl"
    with TestPipeline() as pipeline:
        _ = pipeline | beam.Create(records) | WriteRejects(str(target), block_rows=block_rows)
    # The per-block parts stay for the job to remove after the run (a retried
    # step must find them); part_pattern names them all.
    assert remove_matching([part_pattern(str(target))]) or not records
    assert [p.name for p in target.parent.iterdir()] == ["rejects.jsonl"]
    return [json.loads(line) for line in target.read_text().splitlines()]


def test_count_by_reason_gives_one_dict_even_when_nothing_was_rejected() -> None:
    records = [
        reject(1, "a.dcm", "decode", "unreadable", "x"),
        reject(2, "b.dcm", "decode", "unreadable", "y"),
        reject(3, "c.dcm", "validate", "bad_label", "z"),
    ]
    with TestPipeline() as pipeline:
        counted = pipeline | "Some" >> beam.Create(records) | "CountSome" >> CountByReason()
        none = pipeline | "None" >> beam.Create([]) | "CountNone" >> CountByReason()
        assert_that(counted, equal_to([{"unreadable": 2, "bad_label": 1}]), label="some")
        assert_that(none, equal_to([{}]), label="none")


def test_rejects_are_sorted_by_row_then_path_across_blocks(tmp_path: Path) -> None:
    records = [reject(row, f"p{row % 3}.dcm", "decode", "missing_file", "") for row in range(1, 60)]
    records += [reject(7, "a-second-row-7.dcm", "validate", "duplicate_path", "")]
    records += [reject(None, "no-row.dcm", "read", "ragged_row", "")]
    random.Random(0).shuffle(records)
    # Blocks of 10 rows: 7 blocks, each sorted on its own, then concatenated in order.
    written = _write(tmp_path, records, block_rows=10)
    keys = [(r["row"] is None, r["row"] or 0, r["dicom_path"]) for r in written]
    assert keys == sorted(keys) and len(written) == len(records)
    assert written[-1]["dicom_path"] == "no-row.dcm"


def test_no_rejects_still_writes_an_empty_file(tmp_path: Path) -> None:
    assert _write(tmp_path, [], block_rows=10) == []


def test_progress_logs_now_and_then(caplog) -> None:
    progress = Progress("things", every=0.0)
    with caplog.at_level(logging.INFO, logger="beam_pipelines.transforms.outcomes"):
        for _ in range(3):
            progress.tick()
    assert "things: 3 so far" in caplog.text
    quiet = Progress("things", every=3600)
    with caplog.at_level(logging.INFO, logger="beam_pipelines.transforms.outcomes"):
        caplog.clear()
        for _ in range(100):
            quiet.tick()
    assert not caplog.text
