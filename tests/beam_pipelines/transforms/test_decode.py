"""beam_pipelines.transforms.decode: rows decoded into staged records or rejects."""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines import dicom
from beam_pipelines.contracts import records
from beam_pipelines.storage import tfrecord
from beam_pipelines.transforms.decode import DecodeAndStageFn, pixel_sums
from beam_pipelines.transforms.outcomes import SplitOutcomes
from beam_pipelines.transforms.rows import ValidRow
from tests.support.inputs import valid_row, write_radiograph


def test_decode_makes_records_and_rejects(tmp_path: Path) -> None:
    write_radiograph(tmp_path / "good.dcm", "P1", "S1", shape=(40, 30), age=71, sex="F")
    (tmp_path / "bad.dcm").write_text("not a dicom")
    root = str(tmp_path)
    no_age = ValidRow(1, "P1", "S1", "good.dcm", f"{root}/good.dcm", "", True, None, None, {})
    staging = tmp_path / "staging"
    with TestPipeline() as pipeline:
        assignment = pipeline | "Assignment" >> beam.Create([{"P1": "train"}])
        sizes = pipeline | "Sizes" >> beam.Create([{"train": 3}])
        summaries, rejected = (
            pipeline
            | beam.Create([no_age, valid_row(2, "bad.dcm", root), valid_row(3, "gone.dcm", root)])
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


def test_pixel_sums_are_exact_at_the_largest_values() -> None:
    stored = np.full(records.IMAGE_SHAPE, 65535, np.uint16)
    stored[0, 0, 0] = 1
    pixels = stored.size
    exact = (65535 * (pixels - 1) + 1, 65535**2 * (pixels - 1) + 1, pixels)
    assert pixel_sums(stored) == exact
