"""End to end: xray-score on DICOMs, unlabelled metadata, a glob and shards."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from beam_pipelines import score
from beam_pipelines.contracts import predictions
from tests.support.runners import LOCAL_RUNNER

pytestmark = pytest.mark.slow


def _scores(prefix: Path) -> dict[str, dict]:
    table = predictions.read(sorted(str(p) for p in prefix.parent.glob(f"{prefix.name}-*.parquet")))
    assert table.schema == predictions.SCHEMA
    return {row["dicom_path"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def scored_metadata(synthetic_archive: Path, trained_model: Path, tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("scored") / "archive"
    score.run(
        [
            "--model",
            str(trained_model / "model"),
            "--metadata",
            str(synthetic_archive / "metadata.csv"),
            "--output",
            str(prefix),
            *LOCAL_RUNNER,
        ]
    )
    return prefix


@pytest.fixture(scope="module")
def scored_shards(preprocessed: Path, trained_model: Path, tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("scored") / "shards"
    score.run(
        [
            "--model",
            str(trained_model / "model"),
            "--data_dir",
            str(preprocessed),
            "--output",
            str(prefix),
            "--num_shards",
            "2",
            *LOCAL_RUNNER,
        ]
    )
    return prefix


def test_metadata_input_reconciles(
    scored_metadata: Path, synthetic_archive: Path, trained_model: Path
) -> None:
    summary = json.loads(Path(f"{scored_metadata}.summary.json").read_text())
    with (synthetic_archive / "metadata.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert summary["inputs"] == len(rows) == summary["scored"] + summary["rejected"]
    rejects = [
        json.loads(line)
        for line in (scored_metadata.parent / "rejects" / "archive.jsonl").read_text().splitlines()
    ]
    with (synthetic_archive / "expected_rejects.csv").open() as handle:
        expected = {(int(r["row"]), r["reason"]) for r in csv.DictReader(handle)}
    # Scoring needs no PatientID (the header has one): that row is scored.
    expected = {e for e in expected if e[1] != "missing_patient_id"}
    assert {(r["row"], r["reason"]) for r in rejects} == expected
    scores = _scores(scored_metadata)
    assert len(scores) == summary["scored"]
    card = json.loads((trained_model / "model_card.json").read_text())
    assert {row["model_id"] for row in scores.values()} == {card["model_id"]}
    blank_id = next(r for r in rows if not r["PatientID"])
    assert blank_id["DicomPath"] in scores


def test_scores_match_trainer_and_shards(
    scored_metadata: Path, scored_shards: Path, trained_model: Path
) -> None:
    from_dicom, from_shards = _scores(scored_metadata), _scores(scored_shards)
    assert len(list(scored_shards.parent.glob("shards-*-of-00002.parquet"))) == 2
    for split in ("validation", "test"):
        table = predictions.read(str(trained_model / "predictions" / f"{split}.parquet"))
        for row in table.to_pylist():
            assert from_shards[row["dicom_path"]]["split"] == split
            assert from_shards[row["dicom_path"]]["score"] == pytest.approx(row["score"], abs=1e-6)
    # DICOM and shard inputs feed the model the very same pixels.
    common = sorted(set(from_dicom) & set(from_shards))
    assert len(common) == len(from_shards)
    np.testing.assert_allclose(
        [from_dicom[p]["score"] for p in common],
        [from_shards[p]["score"] for p in common],
        atol=1e-6,
    )
    assert all(from_dicom[p]["label"] == from_shards[p]["label"] for p in common)


def test_unlabelled_metadata_and_glob(
    synthetic_archive: Path, trained_model: Path, tmp_path: Path
) -> None:
    with (synthetic_archive / "metadata.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["DicomPath"].startswith("raw/P")][:5]
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("DicomPath\n" + "".join(r["DicomPath"] + "\n" for r in rows))
    score.run(
        [
            "--model",
            str(trained_model / "model"),
            "--metadata",
            str(unlabelled),
            "--archive_root",
            str(synthetic_archive),
            "--output",
            str(tmp_path / "u"),
            *LOCAL_RUNNER,
        ]
    )
    scores = _scores(tmp_path / "u")
    assert len(scores) == 5 and all(r["label"] is None for r in scores.values())
    assert all(r["patient_id"] == r["dicom_path"].split("/")[1] for r in scores.values())

    score.run(
        [
            "--model",
            str(trained_model / "model"),
            "--dicom_glob",
            str(synthetic_archive / "raw" / "P00000*" / "*.dcm"),
            "--output",
            str(tmp_path / "g"),
            *LOCAL_RUNNER,
        ]
    )
    summary = json.loads((tmp_path / "g.summary.json").read_text())
    globbed = _scores(tmp_path / "g")
    assert (
        summary["inputs"]
        == summary["scored"] + summary["rejected"]
        == len(list((synthetic_archive / "raw").glob("P00000*/*.dcm")))
    )
    assert all(Path(p).parent.name == r["patient_id"] for p, r in globbed.items())


def test_bad_arguments_exit(tmp_path: Path, trained_model: Path) -> None:
    with pytest.raises(SystemExit):
        score.run(["--model", str(tmp_path), "--data_dir", str(tmp_path), "--output", "x"])
    with pytest.raises(SystemExit):
        score.run(["--model", str(trained_model / "model"), "--output", "x"])


def test_a_corrupt_shard_is_one_reject_and_the_rest_is_scored(
    preprocessed: Path, trained_model: Path, tmp_path: Path
) -> None:
    import shutil

    from beam_pipelines.storage import tfrecord

    data = tmp_path / "pre"
    good = sorted((preprocessed / "train").glob("part-*.tfrecord.gz"))[0]
    bad_source = sorted((preprocessed / "test").glob("part-*.tfrecord.gz"))[0]
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    shutil.copy(good, data / "train" / good.name)
    raw = bad_source.read_bytes()
    bad = data / "test" / bad_source.name
    bad.write_bytes(raw[: len(raw) * 2 // 3])  # cut inside a record
    readable = 0
    with pytest.raises((EOFError, ValueError)):
        for _ in tfrecord.read_tfrecord_gz(str(bad)):
            readable += 1
    good_records = sum(1 for _ in tfrecord.read_tfrecord_gz(str(good)))

    prefix = tmp_path / "scored" / "shards"
    summary = score.run(
        ["--model", str(trained_model / "model"), "--data_dir", str(data)]
        + ["--output", str(prefix), *LOCAL_RUNNER]
    )

    assert summary["rejected_by_reason"] == {"corrupt_shard": 1}
    assert summary["scored"] == good_records + readable
    assert summary["inputs"] == summary["scored"] + 1
    assert len(_scores(prefix)) == good_records + readable
    assert summary["rejects_file"] == "rejects/shards.jsonl"  # relative to the prefix's folder
    (line,) = (prefix.parent / summary["rejects_file"]).read_text().splitlines()
    record = json.loads(line)
    assert (record["dicom_path"], record["stage"]) == (str(bad), "read_shard")
    assert f"{readable} records read before it" in record["detail"]


@pytest.mark.parametrize("typed", ["slash", "existing"])
def test_an_output_folder_gets_ordinary_names(
    preprocessed: Path, trained_model: Path, tmp_path: Path, typed: str
) -> None:
    folder = tmp_path / "scores"
    if typed == "existing":
        folder.mkdir()
    given = f"{folder}/" if typed == "slash" else str(folder)
    args = ["--model", str(trained_model / "model"), "--data_dir", str(preprocessed)]
    summary = score.run([*args, "--output", given, *LOCAL_RUNNER])

    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == [
        "commit.json",
        "part-00000-of-00001.parquet",
        "rejects/rejects.jsonl",
        "summary.json",
    ]
    # Beside the folder only its lock: no "-00000-of-00001.parquet", no hidden summary.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".scores.lock", "scores"]
    assert summary["files"] == ["part-00000-of-00001.parquet"]
    assert summary["rejects_file"] == "rejects/rejects.jsonl"
    assert json.loads((folder / "summary.json").read_text()) == summary
    assert len(_scores(folder / "part")) == summary["scored"] > 0
    # A rerun into the committed folder replaces it (its own files are known).
    again = score.run([*args, "--output", str(folder), *LOCAL_RUNNER])
    assert again == summary
