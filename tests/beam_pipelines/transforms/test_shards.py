"""beam_pipelines.transforms.shards: every shard of a plan written, sorted, and only once."""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines.contracts import operating_point, predictions, records, splits
from beam_pipelines.storage import tfrecord
from beam_pipelines.storage.sharding import shard_of
from beam_pipelines.storage.staging import BundleStager
from beam_pipelines.transforms.shards import WriteEveryShard, WritePredictions, WriteShards
from tests.support.inputs import prediction_row


def test_write_every_shard_writes_each_shard_of_the_plan_empty_ones_included(
    tmp_path: Path,
) -> None:
    def write(key: int, values: list[int]) -> str:
        path = tmp_path / f"shard-{key}.txt"
        path.write_text(",".join(str(v) for v in sorted(values)))
        return str(path)

    with TestPipeline() as pipeline:
        plan = pipeline | "Plan" >> beam.Create([4])  # four shards
        written = (
            pipeline
            | "Elements" >> beam.Create([9, 1, 5, 13, 2, 6])
            | WriteEveryShard(
                plan,
                shard_key=lambda element, shards: element % shards,
                every_shard=range,
                write=write,
            )
        )
        assert_that(written, equal_to([str(tmp_path / f"shard-{k}.txt") for k in range(4)]))
    contents = {k: (tmp_path / f"shard-{k}.txt").read_text() for k in range(4)}
    assert contents == {0: "", 1: "1,5,9,13", 2: "2,6", 3: ""}


def _staged_summaries(staging: Path, shard_of_row: dict[int, int], shards: int) -> list[dict]:
    """Decode-stage summaries of train rows whose records are staged in one bundle file."""
    stager = BundleStager(str(staging))
    summaries = []
    for row, shard in shard_of_row.items():
        record = {
            "image": np.zeros(records.IMAGE_SHAPE, np.uint16),
            "label": row % 2,
            "patient_id": f"P{row}",
            "dicom_path": f"{row}.dcm",
            "age": None,
            "original_rows": 2,
            "original_columns": 3,
        }
        ref = stager.append(tfrecord.compress_record(records.serialize(record)))
        summaries.append({"row": row, "split": "train", "shard": ("train", shard, shards)})
        summaries[-1]["staged"] = ref
    stager.close()
    return summaries


def test_write_shards_writes_every_shard_of_a_kept_split_in_the_keyed_row_order(
    tmp_path: Path,
) -> None:
    out, seed = tmp_path / "out", 7
    shard_of_row = {1: 0, 2: 0, 3: 0, 4: 2, 5: 2, 6: 0}  # shard 1 gets nothing
    summaries = _staged_summaries(tmp_path / "staging", shard_of_row, shards=3)
    with TestPipeline() as pipeline:
        # validation had rows but kept none: no validation shard is written.
        sizes = pipeline | "Sizes" >> beam.Create([{"train": 6, "validation": 2}])
        written = pipeline | beam.Create(summaries) | WriteShards(str(out), 3, sizes, seed)
        assert_that(
            written, equal_to([f"{out}/train/part-{k:05d}-of-00003.tfrecord.gz" for k in range(3)])
        )
    assert sorted(p.name for p in out.iterdir()) == ["train"]
    for k in range(3):
        path = out / "train" / f"part-{k:05d}-of-00003.tfrecord.gz"
        shard = [records.parse_example(r) for r in tfrecord.read_tfrecord_gz(str(path))]
        rows = [int(r["dicom_path"].removesuffix(".dcm")) for r in shard]
        expected = [row for row, s in shard_of_row.items() if s == k]
        assert rows == sorted(expected, key=lambda row: splits.order_key(seed, str(row)))


def test_write_predictions_writes_every_file_rows_hashed_by_path_and_sorted(
    tmp_path: Path,
) -> None:
    prefix, files = tmp_path / "out" / "scores", 4
    rows = [prediction_row(f"{name}.dcm", score) for name, score in [("c", 0.25), ("a", 0.5)]]
    rows += [prediction_row("b.dcm", 0.75)]
    point = {"rule": "fixed", "threshold": 0.5, "chosen_on": "--threshold"}
    with TestPipeline() as pipeline:
        written = pipeline | beam.Create(rows) | WritePredictions(str(prefix), files, point)
        # Three rows, four files: at least one is empty, and still written.
        assert_that(written, equal_to([f"{prefix}-{k:05d}-of-00004.parquet" for k in range(files)]))
    read = []
    for k in range(files):
        path = f"{prefix}-{k:05d}-of-00004.parquet"
        table = pq.read_table(path)
        assert table.schema.equals(predictions.SCHEMA)
        assert operating_point.from_footers([path]) == [point]
        names = [row["dicom_path"] for row in table.to_pylist()]
        assert names == sorted(names) and all(shard_of(n, files) == k for n in names)
        read += table.to_pylist()
    assert sorted(read, key=lambda r: r["dicom_path"]) == sorted(
        rows, key=lambda r: r["dicom_path"]
    )
