"""The preprocessing stages as TestPipeline units (main and reject outputs)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from archive_tools.dicom_writer import PixelFormat, RadiographHeader, to_stored, write_dicom
from beam_pipelines import dicom
from beam_pipelines.contracts import records
from beam_pipelines.storage import tfrecord
from beam_pipelines.transforms.decode import DecodeAndStageFn
from beam_pipelines.transforms.outcomes import SplitOutcomes
from beam_pipelines.transforms.rows import RejectDuplicatePaths, ValidateRowFn, ValidRow


def _cells(path: str, label: str = "true", patient: str = "P1") -> dict[str, str]:
    return {
        "PatientID": patient,
        "StudyID": "S1",
        "DicomPath": path,
        "ViewPosition": "PA",
        "Abnormal": label,
        "Age": "40",
        "Sex": "M",
    }


def _valid(row: int, path: str, root: str = "/archive") -> ValidRow:
    return ValidRow(row, "P1", "S1", path, f"{root}/{path}", "PA", True, 40, "M", {})


def test_validate_rows_routes_rejects() -> None:
    with TestPipeline() as pipeline:
        valid, rejected = (
            pipeline
            | beam.Create(
                [(1, _cells("a.dcm")), (2, _cells("b.dcm", "maybe")), (3, _cells("../c.dcm"))]
            )
            | beam.ParDo(ValidateRowFn("/archive"))
            | SplitOutcomes()
        )
        assert_that(valid | "Rows" >> beam.Map(lambda r: r.row), equal_to([1]), label="valid")
        assert_that(
            rejected | beam.Map(lambda r: (r["row"], r["reason"])),
            equal_to([(2, "bad_label"), (3, "path_escapes_root")]),
            label="rejected",
        )


def test_duplicate_paths_keep_the_first_row() -> None:
    rows = [_valid(5, "a.dcm"), _valid(2, "a.dcm"), _valid(9, "a.dcm"), _valid(3, "b.dcm")]
    with TestPipeline() as pipeline:
        kept, rejected = pipeline | beam.Create(rows) | RejectDuplicatePaths() | SplitOutcomes()
        assert_that(kept | "Rows" >> beam.Map(lambda r: r.row), equal_to([2, 3]), label="kept")
        assert_that(
            rejected | beam.Map(lambda r: (r["row"], r["reason"], r["detail"])),
            equal_to(
                [
                    (5, "duplicate_path", "same file as row 2"),
                    (9, "duplicate_path", "same file as row 2"),
                ]
            ),
            label="rejected",
        )


def test_symlinks_to_one_file_are_duplicates(tmp_path: Path) -> None:
    (tmp_path / "by_patient").mkdir()
    (tmp_path / "by_patient" / "img.dcm").write_bytes(b"x")
    (tmp_path / "by_date").symlink_to("by_patient", target_is_directory=True)
    (tmp_path / "link.dcm").symlink_to("by_patient/img.dcm")
    os.link(tmp_path / "by_patient" / "img.dcm", tmp_path / "hard.dcm")
    root = str(tmp_path)
    paths = ["by_date/img.dcm", "by_patient/img.dcm", "link.dcm", "hard.dcm"]
    rows = [_valid(n, path, root) for n, path in enumerate(paths, start=1)]
    with TestPipeline() as pipeline:
        kept, rejected = pipeline | beam.Create(rows) | RejectDuplicatePaths() | SplitOutcomes()
        # A hard link is another file (same bytes, like any copy): kept.
        assert_that(kept | "Rows" >> beam.Map(lambda r: r.row), equal_to([1, 4]), label="kept")
        assert_that(
            rejected | beam.Map(lambda r: (r["row"], r["detail"])),
            equal_to([(2, "same file as row 1"), (3, "same file as row 1")]),
            label="rejected",
        )


def test_decode_makes_records_and_rejects(tmp_path: Path) -> None:
    fmt = PixelFormat(bits_stored=12)
    image = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(40, 30)
    buffer = io.BytesIO()
    write_dicom(
        buffer,
        to_stored(image, fmt),
        fmt,
        "explicit_le",
        RadiographHeader("P1", "S1", patient_age=71, patient_sex="F"),
    )
    (tmp_path / "good.dcm").write_bytes(buffer.getvalue())
    (tmp_path / "bad.dcm").write_text("not a dicom")
    root = str(tmp_path)
    no_age = ValidRow(1, "P1", "S1", "good.dcm", f"{root}/good.dcm", "", True, None, None, {})
    staging = tmp_path / "staging"
    with TestPipeline() as pipeline:
        assignment = pipeline | "Assignment" >> beam.Create([{"P1": "train"}])
        sizes = pipeline | "Sizes" >> beam.Create([{"train": 3}])
        summaries, rejected = (
            pipeline
            | beam.Create([no_age, _valid(2, "bad.dcm", root), _valid(3, "gone.dcm", root)])
            | beam.ParDo(
                DecodeAndStageFn(dicom.DecodeOptions(), "pad", str(staging), 0),
                beam.pvalue.AsSingleton(assignment),
                beam.pvalue.AsSingleton(sizes),
            )
            | SplitOutcomes()
        )
        assert_that(
            summaries | beam.Map(lambda s: (s["row"], s["split"], s["shard"], s["pixel_sums"][2])),
            equal_to([(1, "train", ("train", 0, 1), 224 * 224)]),
            label="summaries",
        )
        assert_that(
            rejected | beam.Map(lambda r: (r["row"], r["stage"], r["reason"])),
            equal_to([(2, "decode", "not_dicom"), (3, "decode", "missing_file")]),
            label="rejected",
        )
    # One bundle, one staging file holding the one kept record's chunk.
    (staged,) = staging.rglob("*.chunks")
    # The staged chunk is already compressed: the shard writer only concatenates.
    shard = str(tmp_path / "one.tfrecord.gz")
    assert tfrecord.write_compressed_gz(shard, [staged.read_bytes()]) == 1
    (serialized,) = tfrecord.read_tfrecord_gz(shard)
    record = records.parse_example(serialized)
    # The header fills what metadata.csv left unknown.
    assert (record["age"], record["sex"]) == (71, "F")
    assert (record["original_rows"], record["original_columns"]) == (40, 30)
    assert record["image"].shape == (224, 224, 1)


def test_progress_logs_now_and_then(caplog) -> None:
    import logging

    from beam_pipelines.transforms.outcomes import Progress

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


def test_pixel_sums_are_exact_at_the_largest_values() -> None:
    from beam_pipelines.transforms.decode import pixel_sums

    stored = np.full(records.IMAGE_SHAPE, 65535, np.uint16)
    stored[0, 0, 0] = 1
    pixels = stored.size
    exact = (65535 * (pixels - 1) + 1, 65535**2 * (pixels - 1) + 1, pixels)
    assert pixel_sums(stored) == exact


def test_assign_splits_counts_each_splits_rows() -> None:
    import dataclasses

    from beam_pipelines.transforms.preprocessing import AssignSplits

    # 12 patients, 1-3 rows each; a patient is abnormal if any of its rows is.
    rows = [
        dataclasses.replace(
            _valid(n, f"{n}.dcm"), patient_id=f"P{n % 12}", abnormal=(n % 12 < 4 and n > 12)
        )
        for n in range(1, 31)
    ]
    per_patient = {f"P{k}": sum(1 for r in rows if r.patient_id == f"P{k}") for k in range(12)}

    def check(plans: list) -> None:
        [plan] = plans
        assignment, counted = plan["assignment"], plan["rows"]
        assert sorted(assignment) == sorted(per_patient)
        expected: dict[str, int] = {}
        for patient, split in assignment.items():
            expected[split] = expected.get(split, 0) + per_patient[patient]
        assert counted == expected and sum(counted.values()) == len(rows)

    with TestPipeline() as pipeline:
        plan = pipeline | beam.Create(rows) | AssignSplits((0.5, 0.25, 0.25), 0, {})
        assert_that(plan, check)


def test_kept_stats_merged_from_parts_equal_one_pass() -> None:
    from beam_pipelines.transforms.preprocessing import KeptStats

    stats = KeptStats()
    summaries = [
        {
            "split": split,
            "label": n % 2,
            "pixel_sums": (n, n * n, 10) if split == "train" else (0, 0, 0),
        }
        for n, split in enumerate(["train", "validation", "test", "train"] * 5)
    ]

    def fold(items: list) -> tuple:
        acc = stats.create_accumulator()
        for item in items:
            acc = stats.add_input(acc, item)
        return acc

    whole = stats.extract_output(fold(summaries))
    parts = [fold(summaries[k::3]) for k in range(3)] + [stats.create_accumulator()]
    assert stats.extract_output(stats.merge_accumulators(parts)) == whole
    assert sum(whole["counts"].values()) == len(summaries)
    assert whole["counts"]["train/abnormal"] == 5 and whole["pixels"]["pixels"] == 100
