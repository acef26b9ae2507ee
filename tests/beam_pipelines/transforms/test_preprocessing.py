"""beam_pipelines.transforms.preprocessing: splits, decoded shards and splits.csv, the manifest."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines import dicom
from beam_pipelines.contracts import records, splits
from beam_pipelines.contracts.rejects import reject
from beam_pipelines.storage import tfrecord
from beam_pipelines.storage.sharding import shard_of
from beam_pipelines.transforms.preprocessing import (
    AssignSplits,
    KeptStats,
    Preprocess,
    WriteManifest,
)
from tests.support.inputs import valid_row, write_radiograph


def test_assign_splits_counts_each_splits_rows() -> None:
    # 12 patients, 1-3 rows each; a patient is abnormal if any of its rows is.
    rows = [
        dataclasses.replace(
            valid_row(n, f"{n}.dcm"), patient_id=f"P{n % 12}", abnormal=(n % 12 < 4 and n > 12)
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


def test_preprocess_writes_every_decoded_row_to_its_shard_and_every_patient_to_splits_csv(
    tmp_path: Path,
) -> None:
    root, out = tmp_path / "archive", tmp_path / "out"
    root.mkdir()
    write_radiograph(root / "a.dcm", "P1")
    write_radiograph(root / "b.dcm", "P2")
    write_radiograph(root / "c.dcm", "P1")
    (root / "bad.dcm").write_text("not a dicom")
    rows = [
        valid_row(1, "a.dcm", str(root), "P1", abnormal=True),
        valid_row(2, "b.dcm", str(root), "P2", abnormal=False),
        valid_row(3, "c.dcm", str(root), "P1", abnormal=False),
        valid_row(4, "bad.dcm", str(root), "P3", abnormal=True),
    ]
    seed, shards = 5, 2

    def check_stats(results: list[dict[str, Any]]) -> None:
        [stats] = results
        assert stats["counts"] == {"train/abnormal": 1, "train/normal": 2}
        assert stats["pixels"]["pixels"] == 3 * 224 * 224 and 0 < stats["pixels"]["mean"] < 1

    with TestPipeline() as pipeline:
        written = (
            pipeline
            | beam.Create(rows)
            | Preprocess(
                str(out), (1.0, 0.0, 0.0), seed, {}, shards, dicom.DecodeOptions(), "pad", None
            )
        )
        assert_that(
            written["shards"],
            equal_to([f"{out}/train/part-{k:05d}-of-00002.tfrecord.gz" for k in range(shards)]),
            label="shards",
        )
        assert_that(written["splits"], equal_to([f"{out}/splits.csv"]), label="splits")
        assert_that(written["kept_stats"], check_stats, label="kept_stats")
        assert_that(
            written["rejects"] | beam.Map(lambda r: (r["row"], r["stage"], r["reason"])),
            equal_to([(4, "decode", "not_dicom")]),
            label="rejects",
        )
    # P3's only image failed to decode: the patient still has its place.
    assert (out / "splits.csv").read_text() == "PatientID,split\nP1,train\nP2,train\nP3,train\n"
    row_of = {r.dicom_path: r.row for r in rows}
    kept = set()
    for k in range(shards):
        path = out / "train" / f"part-{k:05d}-of-00002.tfrecord.gz"
        shard = [records.parse_example(r) for r in tfrecord.read_tfrecord_gz(str(path))]
        names = [r["dicom_path"] for r in shard]
        assert all(shard_of(name, shards) == k for name in names)
        # Records in a shard follow the keyed hash of their row: a stable shuffle.
        assert names == sorted(names, key=lambda n: splits.order_key(seed, str(row_of[n])))
        kept |= {(r["dicom_path"], r["patient_id"], r["label"]) for r in shard}
    assert kept == {("a.dcm", "P1", 1), ("b.dcm", "P2", 0), ("c.dcm", "P1", 0)}


def test_write_manifest_writes_the_rejects_then_a_manifest_that_reconciles(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shards = [f"{out}/validation/part-00000-of-00001.tfrecord.gz"]
    shards += [f"{out}/train/part-00000-of-00001.tfrecord.gz"]
    stats = {
        "counts": {"train/abnormal": 2, "validation/normal": 1},
        "pixels": {"mean": 0.5, "std": 0.25, "pixels": 10},
    }
    rejected = [
        reject(4, "d.dcm", "decode", "not_dicom", "no preamble"),
        reject(2, "b.dcm", "validate", "bad_label", "Abnormal is maybe"),
    ]
    settings = {"seed": 0, "split": [0.8, 0.1, 0.1]}
    with TestPipeline() as pipeline:
        written = {
            "kept_stats": pipeline | "KeptStats" >> beam.Create([stats]),
            "shards": pipeline | "Shards" >> beam.Create(shards),
            "splits": pipeline | "Splits" >> beam.Create([f"{out}/splits.csv"]),
        }
        rejects = pipeline | "Rejects" >> beam.Create(rejected)
        manifest_path = (
            pipeline
            | "Rows" >> beam.Create(range(5))
            | WriteManifest(str(out), rejects, written, settings)
        )
        assert_that(manifest_path, equal_to([f"{out}/manifest.json"]))
    text = (out / "manifest.json").read_text()
    manifest = json.loads(text)
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    assert (manifest["input_rows"], manifest["kept"], manifest["rejected"]) == (5, 3, 2)
    assert manifest["counts"] == {
        "train": {"normal": 0, "abnormal": 2},
        "validation": {"normal": 1, "abnormal": 0},
        "test": {"normal": 0, "abnormal": 0},
    }
    assert manifest["rejected_by_reason"] == {"bad_label": 1, "not_dicom": 1}
    assert manifest["files"] == {
        "shards": [
            "train/part-00000-of-00001.tfrecord.gz",
            "validation/part-00000-of-00001.tfrecord.gz",
        ],
        "rejects": "rejects/rejects.jsonl",
        "splits": "splits.csv",
    }
    assert manifest["options"] == settings and manifest["train_pixel_stats"] == stats["pixels"]
    lines = (out / "rejects" / "rejects.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rejected[::-1]  # sorted by row
