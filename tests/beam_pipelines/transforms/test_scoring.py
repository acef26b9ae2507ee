"""beam_pipelines.transforms.scoring: each input read into examples, scored, and written."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines import dicom
from beam_pipelines.contracts import predictions, records
from beam_pipelines.contracts.rejects import reject
from beam_pipelines.storage import tfrecord
from beam_pipelines.transforms.decode import prediction_columns
from beam_pipelines.transforms.scoring import ReadExamples, Score, WriteScores
from tests.support.inputs import prediction_row, write_radiograph


def _read(pipeline: beam.Pipeline, **source: str) -> tuple[Any, Any, Any]:
    """ReadExamples of one input (the others None), decoded as the jobs do by default."""
    inputs = {"shard_pattern": None, "metadata": None, "dicom_glob": None, **source}
    return pipeline | ReadExamples(
        inputs["shard_pattern"],
        inputs["metadata"],
        inputs["dicom_glob"],
        str(Path(inputs["metadata"] or ".").parent),
        frozenset(),
        dicom.DecodeOptions(),
        "pad",
    )


def _examples(examples: Any) -> Any:
    return examples | "Examples" >> beam.MapTuple(
        lambda meta, image: (meta["row"], meta["dicom_path"], meta["patient_id"], image.shape)
    )


def _rejects(rejects: Any) -> Any:
    return rejects | "Rejects" >> beam.Map(
        lambda r: (r["row"], r["dicom_path"], r["stage"], r["reason"])
    )


def test_read_examples_from_shards_a_corrupt_one_is_one_reject(tmp_path: Path) -> None:
    good = tmp_path / "data" / "train" / "part-00000-of-00001.tfrecord.gz"
    corrupt = tmp_path / "data" / "test" / "part-00000-of-00001.tfrecord.gz"
    good.parent.mkdir(parents=True)
    corrupt.parent.mkdir(parents=True)
    stored = [np.full(records.IMAGE_SHAPE, 1000 * k, np.uint16) for k in (1, 2)]
    serialized = [
        records.serialize(
            {
                "image": image,
                "label": k % 2,
                "patient_id": f"P{k}",
                "dicom_path": f"{k}.dcm",
                "age": None,
                "original_rows": 2,
                "original_columns": 3,
            }
        )
        for k, image in zip((1, 2), stored, strict=True)
    ]
    tfrecord.write_tfrecord_gz(str(good), serialized)
    corrupt.write_bytes(b"not gzip at all")
    with TestPipeline() as pipeline:
        inputs, examples, rejects = _read(
            pipeline, shard_pattern=f"{tmp_path}/data/*/part-*.tfrecord.gz"
        )
        # Two records and one corrupt shard: three inputs.
        assert_that(inputs | beam.combiners.Count.Globally(), equal_to([3]), label="inputs")
        assert_that(
            examples
            | beam.MapTuple(
                lambda meta, image: (
                    meta["split"],
                    meta["dicom_path"],
                    meta["label"],
                    round(float(image.max()) * records.IMAGE_MAX),
                )
            ),
            equal_to([("train", "1.dcm", 1, 1000), ("train", "2.dcm", 0, 2000)]),
            label="examples",
        )
        assert_that(
            _rejects(rejects),
            equal_to([(None, str(corrupt), "read_shard", "corrupt_shard")]),
            label="rejects",
        )


def test_read_examples_from_metadata_rows(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    write_radiograph(archive / "a.dcm", patient="HEADER1")
    (archive / "bad.dcm").write_text("not a dicom")
    metadata = archive / "metadata.csv"
    # Scoring archives may be unlabelled and may leave PatientID to the header.
    metadata.write_text("DicomPath,Abnormal\na.dcm,\nbad.dcm,true\n../x.dcm,false\n")
    with TestPipeline() as pipeline:
        inputs, examples, rejects = _read(pipeline, metadata=str(metadata))
        assert_that(inputs | beam.Map(lambda r: r[0]), equal_to([1, 2, 3]), label="inputs")
        assert_that(
            _examples(examples), equal_to([(1, "a.dcm", "HEADER1", (224, 224, 1))]), label="ex"
        )
        assert_that(
            _rejects(rejects),
            equal_to(
                [
                    (2, "bad.dcm", "decode", "not_dicom"),
                    (3, "../x.dcm", "validate", "path_escapes_root"),
                ]
            ),
            label="rejects",
        )


def test_read_examples_from_a_glob(tmp_path: Path) -> None:
    good = write_radiograph(tmp_path / "a.dcm", patient="G1")
    bad = tmp_path / "b.dcm"
    bad.write_text("not a dicom")
    with TestPipeline() as pipeline:
        inputs, examples, rejects = _read(pipeline, dicom_glob=f"{tmp_path}/*.dcm")
        assert_that(inputs, equal_to([str(good), str(bad)]), label="inputs")
        assert_that(
            _examples(examples), equal_to([(None, str(good), "G1", (224, 224, 1))]), label="ex"
        )
        assert_that(
            _rejects(rejects), equal_to([(None, str(bad), "decode", "not_dicom")]), label="rej"
        )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RESULTS/model with a model.keras scoring sigmoid(2 * mean pixel - 1): cheap to build."""
    import keras

    model = keras.Sequential(
        [
            keras.Input(records.IMAGE_SHAPE),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.layers[-1].set_weights([np.array([[2.0]], np.float32), np.array([-1.0], np.float32)])
    folder = tmp_path_factory.mktemp("results") / "model"
    folder.mkdir()
    model.save(folder / "model.keras")
    return folder


def test_score_turns_examples_into_predictions_and_a_failed_input_into_a_reject(
    tiny_model: Path,
) -> None:
    def example(row: int, value: float, shape: tuple[int, ...] = records.IMAGE_SHAPE) -> tuple:
        meta = prediction_columns(dicom_path=f"{row}.dcm", row=row, patient_id=f"P{row}")
        return meta, np.full(shape, value, np.float32)

    examples = [example(1, 0.25), example(2, 0.75), example(3, 0.5, shape=(3, 3))]

    def check(rows: list[dict[str, Any]]) -> None:
        by_path = {row["dicom_path"]: row for row in rows}
        assert sorted(by_path) == ["1.dcm", "2.dcm"]
        for name, value, finding in [("1.dcm", 0.25, 0), ("2.dcm", 0.75, 1)]:
            row = by_path[name]
            expected = 1 / (1 + math.exp(-(2 * value - 1)))
            assert row["score"] == pytest.approx(expected, abs=1e-6)
            assert (row["predicted"], row["model_id"]) == (finding, "tiny")
            assert "row" not in row and row["patient_id"] == f"P{name[0]}"

    with TestPipeline() as pipeline:
        scored, failed = (
            pipeline | beam.Create(examples) | Score(str(tiny_model), 2, "tiny", threshold=0.5)
        )
        assert_that(scored, check, label="scored")
        assert_that(
            _rejects(failed), equal_to([(3, "3.dcm", "score", "inference_failed")]), label="rej"
        )


def test_write_scores_writes_predictions_rejects_then_a_summary_that_reconciles(
    tmp_path: Path,
) -> None:
    work = tmp_path / "work"
    paths = predictions.scoring_files(str(work), "scores")
    prefix = work / "scores"
    assert paths == {
        "prefix": str(prefix),
        "summary": f"{prefix}.summary.json",
        "rejects": str(work / "rejects" / "scores.jsonl"),
    }
    rows = [prediction_row("b.dcm", 0.75), prediction_row("a.dcm", 0.25)]
    rejected = [reject(3, "c.dcm", "decode", "not_dicom", "no preamble")]
    point = {"rule": "fixed", "threshold": 0.5, "chosen_on": "--threshold"}
    fields = {"model_id": "m", "point": point, "pseudonymized": None}
    with TestPipeline() as pipeline:
        scored = pipeline | "Scored" >> beam.Create(rows)
        rejects = pipeline | "Rejected" >> beam.Create(rejected)
        summary = (
            pipeline
            | "Inputs" >> beam.Create(range(3))
            | WriteScores(paths, 0, scored, rejects, fields)
        )
        assert_that(summary, equal_to([f"{prefix}.summary.json"]))
    text = (work / "scores.summary.json").read_text()
    document = json.loads(text)
    assert text == json.dumps(document, indent=2, sort_keys=True) + "\n"
    assert document == {
        "inputs": 3,
        "scored": 2,
        "rejected": 1,
        "rejected_by_reason": {"not_dicom": 1},
        "model_id": "m",
        "operating_point": point,
        "pseudonymized": None,
        "files": ["scores-00000-of-00001.parquet"],
        "rejects_file": "rejects/scores.jsonl",
    }
    table = predictions.read([str(work / "scores-00000-of-00001.parquet")])
    assert table.to_pylist() == rows[::-1]  # sorted by path
    lines = Path(paths["rejects"]).read_text().splitlines()
    assert [json.loads(line) for line in lines] == rejected
