"""End to end: xray-preprocess on a synthetic archive with broken rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from beam_pipelines import dicom, preprocess
from beam_pipelines.contracts import records
from beam_pipelines.storage import tfrecord
from tests.support.runners import LOCAL_RUNNER

pytestmark = pytest.mark.slow


def _read_records(path: Path) -> list[dict]:
    return [records.parse_example(r) for r in tfrecord.read_tfrecord_gz(str(path))]


@pytest.fixture(scope="module")
def archive(synthetic_archive: Path) -> Path:
    return synthetic_archive


@pytest.fixture(scope="module")
def output(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("preprocessed")
    manifest = preprocess.run(
        ["--metadata", str(archive / "metadata.csv"), "--output_dir", str(out), *LOCAL_RUNNER]
    )
    return out, manifest


def test_every_row_ends_in_a_shard_or_a_reject(archive: Path, output: tuple[Path, dict]) -> None:
    out, manifest = output
    with (archive / "metadata.csv").open() as handle:
        input_rows = sum(1 for _ in csv.DictReader(handle))
    records = {
        s: [r for f in sorted((out / s).glob("part-*.tfrecord.gz")) for r in _read_records(f)]
        for s in ("train", "validation", "test")
    }
    rejects = [
        json.loads(line)
        for f in (out / "rejects").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    kept = sum(len(v) for v in records.values())
    assert manifest["input_rows"] == input_rows == kept + len(rejects)
    assert manifest["kept"] == kept and manifest["rejected"] == len(rejects)
    for split, recs in records.items():
        assert manifest["counts"][split]["abnormal"] == sum(r["label"] for r in recs)
    with (archive / "expected_rejects.csv").open() as handle:
        expected = {(int(r["row"]), r["reason"]) for r in csv.DictReader(handle)}
    assert {(r["row"], r["reason"]) for r in rejects} == expected
    assert all(set(r) == {"row", "dicom_path", "stage", "reason", "detail"} for r in rejects)

    # Splits are by patient, as splits.csv says.
    with (out / "splits.csv").open() as handle:
        assignment = {r["PatientID"]: r["split"] for r in csv.DictReader(handle)}
    for split, recs in records.items():
        assert all(assignment[r["patient_id"]] == split for r in recs)
    assert records["train"] and records["validation"] and records["test"]

    # Pixels are exactly what the shared decoder gives, to 16 bits.
    for record in records["validation"][:5]:
        expected_image = dicom.to_model_input(dicom.read_image(str(archive / record["dicom_path"])))
        assert np.abs(record["image"] - expected_image).max() <= 0.5 / 65535 + 1e-6
    assert manifest["train_pixel_stats"]["pixels"] == len(records["train"]) * 224 * 224


def test_pinned_rerun_moves_no_patient(
    archive: Path, output: tuple[Path, dict], tmp_path: Path
) -> None:
    out, _ = output
    rerun = tmp_path / "rerun"
    preprocess.run(
        [
            "--metadata",
            str(archive / "metadata.csv"),
            "--output_dir",
            str(rerun),
            "--seed",
            "99",
            "--pin_splits",
            str(out / "splits.csv"),
            *LOCAL_RUNNER,
        ]
    )
    assert (rerun / "splits.csv").read_text() == (out / "splits.csv").read_text()


def test_missing_columns_fail_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "metadata.csv"
    bad.write_text("PatientID,Path\nP1,a.dcm\n")
    with pytest.raises(SystemExit) as exited:
        preprocess.run(
            ["--metadata", str(bad), "--output_dir", str(tmp_path / "out"), *LOCAL_RUNNER]
        )
    assert exited.value.code == 2
    assert "lacks required columns ['DicomPath', 'Abnormal']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_rerun_is_byte_identical(archive: Path, output: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = output
    rerun = tmp_path / "rerun"
    preprocess.run(
        [
            "--metadata",
            str(archive / "metadata.csv"),
            "--output_dir",
            str(rerun),
            "--runner=FnApiRunner",
            "--direct_running_mode=multi_processing",
            "--direct_num_workers=2",
        ]
    )
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(rerun) for p in rerun.rglob("*") if p.is_file())
    for name in files:
        assert (out / name).read_bytes() == (rerun / name).read_bytes(), name


def test_rerun_replaces_stale_shards(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--metadata", str(archive / "metadata.csv"), "--output_dir", str(out), *LOCAL_RUNNER]
    preprocess.run([*args, "--num_shards", "3"])
    assert len(list((out / "train").glob("part-*"))) == 3
    preprocess.run([*args, "--num_shards", "1"])
    assert [p.name for p in (out / "train").glob("part-*")] == ["part-00000-of-00001.tfrecord.gz"]


def test_splits_are_stratified_by_patient_label(archive: Path, output: tuple[Path, dict]) -> None:
    out, _ = output
    with (archive / "metadata.csv").open() as handle:
        rows = [
            r
            for r in csv.DictReader(handle)
            if r["PatientID"] and r["Abnormal"] in ("true", "false")
        ]
    abnormal: dict[str, bool] = {}
    for r in rows:
        abnormal[r["PatientID"]] = abnormal.get(r["PatientID"], False) or r["Abnormal"] == "true"
    with (out / "splits.csv").open() as handle:
        assignment = {r["PatientID"]: r["split"] for r in csv.DictReader(handle)}
    for label in (False, True):
        members = [p for p in assignment if abnormal[p] == label]
        for split, ratio in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
            count = sum(assignment[p] == split for p in members)
            assert abs(count - ratio * len(members)) < 1, (label, split)


def test_records_of_an_archive_listed_label_by_label_are_mixed_in_shards(
    archive: Path, tmp_path: Path
) -> None:
    # Training reads shards through a bounded shuffle buffer: records in
    # metadata order would give batches of one label at a time.
    from beam_pipelines.contracts import splits

    with (archive / "metadata.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    rows.sort(key=lambda r: r["Abnormal"] == "true")
    by_label = tmp_path / "by_label.csv"
    with by_label.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields or [])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    preprocess.run(
        ["--metadata", str(by_label), "--archive_root", str(archive), "--output_dir", str(out)]
        + ["--num_shards", "1", "--seed", "3", *LOCAL_RUNNER]
    )
    row_of: dict[str, int] = {}
    for number, r in enumerate(rows, start=1):
        row_of.setdefault(r["DicomPath"], number)  # a repeated path is a duplicate reject
    records = _read_records(next((out / "train").glob("part-*")))
    labels = [r["label"] for r in records]
    assert sum(a != b for a, b in zip(labels, labels[1:], strict=False)) > 2, labels
    rows_in_file = [row_of[r["dicom_path"]] for r in records]
    assert rows_in_file == sorted(rows_in_file, key=lambda n: splits.order_key(3, str(n)))
