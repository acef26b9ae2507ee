"""End to end: xray-train on tiny synthetic shards, two replicas, every output."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from beam_pipelines.contracts import predictions, records
from beam_pipelines.storage import tfrecord

pytestmark = pytest.mark.slow


def _train(*args: str, **kwargs) -> subprocess.Popen:
    # A fresh process: logical CPU devices must be set before TF initializes.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _finish(process: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def trained(preprocessed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results")
    _finish(
        _train(
            "--data_dir",
            str(preprocessed),
            "--output_dir",
            str(out),
            "--epochs",
            "2",
            "--global_batch_size",
            "8",
            "--steps_per_epoch",
            "3",
            "--logical_cpus",
            "2",
            "--verbose",
            "0",
        )
    )
    return out


def test_writes_every_output(trained: Path, preprocessed: Path) -> None:
    for name in (
        "model/saved_model.pb",
        "model/model.keras",
        "history.csv",
        "config.json",
        "model_card.json",
        "predictions/validation.parquet",
        "predictions/test.parquet",
    ):
        assert (trained / name).exists(), name
    assert list((trained / "logs").rglob("events.out.tfevents.*"))
    assert not (trained / "backup").exists()  # removed after a completed run
    card = json.loads((trained / "model_card.json").read_text())
    assert card["replicas"] == 2 and card["epochs_run"] == 2
    with (trained / "history.csv").open() as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [0, 1]
    assert json.loads((trained / "config.json").read_text())["logical_cpus"] == 2

    manifest = json.loads((preprocessed / "manifest.json").read_text())
    for split in ("validation", "test"):
        table = predictions.read(str(trained / "predictions" / f"{split}.parquet"))
        assert table.schema == predictions.SCHEMA
        assert table.num_rows == sum(manifest["counts"][split].values())
        assert set(table.column("split").to_pylist()) == {split}
        assert table.column("model_id").to_pylist()[0] == card["model_id"]


def test_exported_model_reloads_and_predicts_the_same(trained: Path, preprocessed: Path) -> None:
    import keras
    import tensorflow as tf

    examples = [
        records.parse_example(r)
        for path in sorted((preprocessed / "validation").glob("*.tfrecord.gz"))
        for r in tfrecord.read_tfrecord_gz(str(path))
    ][:6]
    images = np.stack([r["image"] for r in examples])
    table = predictions.read(str(trained / "predictions" / "validation.parquet")).to_pydict()
    expected = dict(zip(table["dicom_path"], table["score"], strict=True))
    wanted = np.array([expected[r["dicom_path"]] for r in examples], np.float32)

    served = tf.saved_model.load(str(trained / "model")).signatures["serving_default"]
    scores = next(iter(served(tf.constant(images)).values())).numpy().reshape(-1)
    np.testing.assert_allclose(scores, wanted, atol=1e-5)

    model = keras.saving.load_model(str(trained / "model" / "model.keras"), safe_mode=True)
    np.testing.assert_allclose(model.predict(images, verbose=0).reshape(-1), wanted, atol=1e-5)


def _history_rows(out: Path) -> list[dict[str, float]]:
    with (out / "history.csv").open() as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def test_killed_run_resumes_from_backup_and_ends_as_an_uninterrupted_run(
    preprocessed: Path, tmp_path: Path
) -> None:
    def args(out: Path) -> list[str]:
        return [
            "--data_dir",
            str(preprocessed),
            "--output_dir",
            str(out),
            "--epochs",
            "4",
            "--global_batch_size",
            "8",
            "--steps_per_epoch",
            "6",
            "--verbose",
            "2",
            "--seed",
            "0",
            "--deterministic",
            "true",
            # Plateau patience 1: learning-rate cuts (and their counters) span the kill.
            "--early_stopping_patience",
            "2",
        ]

    resumed, uninterrupted = tmp_path / "resumed", tmp_path / "uninterrupted"
    work = tmp_path / ".resumed.work"  # where a run writes until it commits
    process = _train(*args(resumed), start_new_session=True)
    deadline = time.monotonic() + 300
    # Kill hard once the first epoch's backup is on disk, during the next epoch.
    while not list((work / "backup").rglob("*.h5")) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.1)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = [int(r["epoch"]) for r in _history_rows(work)]
    assert done and done[-1] < 3, "the first run finished before it could be killed"
    assert not resumed.exists()  # nothing committed

    reference = _train(*args(uninterrupted))  # side by side: same results, less wall time
    _finish(_train(*args(resumed)))
    _finish(reference)
    got, expected = _history_rows(resumed), _history_rows(uninterrupted)
    # Resumed: no epoch repeated or lost.
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected]
    assert len(expected) >= 3
    # Same batches, augmentation, dropout masks, optimizer and callback state
    # as without the kill: every metric of every epoch matches to float
    # rounding (measured: bit-identical with --deterministic on one machine).
    for row, want in zip(got, expected, strict=True):
        assert row == pytest.approx(want, rel=1e-5, abs=1e-6), (row, want)
    card = json.loads((resumed / "model_card.json").read_text())
    card_expected = json.loads((uninterrupted / "model_card.json").read_text())
    assert card["epochs_run"] == len(expected)
    assert card["best_val_auc"] == pytest.approx(max(r["val_auc"] for r in got))
    assert card["best_val_auc"] == pytest.approx(card_expected["best_val_auc"], abs=1e-6)
    for split in ("validation", "test"):
        scores = predictions.read(str(resumed / "predictions" / f"{split}.parquet"))
        reference = predictions.read(str(uninterrupted / "predictions" / f"{split}.parquet"))
        np.testing.assert_allclose(
            scores.column("score").to_numpy(), reference.column("score").to_numpy(), atol=1e-5
        )
    assert not (resumed / "backup").exists()
    assert not work.exists()


def test_evaluation_padding_does_not_change_metrics(preprocessed: Path) -> None:
    import keras

    from trainer import data
    from trainer.config import TrainConfig
    from trainer.models import build_model

    config = TrainConfig(data_dir=str(preprocessed), output_dir="unused", global_batch_size=8)
    files = data.shard_files(str(preprocessed), "validation")
    count = sum(1 for f in files for _ in tfrecord.read_tfrecord_gz(f))
    assert count % 8, "fixture should leave a partial batch"
    model = build_model("simple_cnn")
    model.compile(
        loss=keras.losses.BinaryCrossentropy(reduction="mean_with_sample_weight"),
        weighted_metrics=[keras.metrics.AUC(name="auc")],
    )
    padded = model.evaluate(
        data.evaluation_dataset(config, files, pad=True), return_dict=True, verbose=0
    )
    unpadded = data.evaluation_dataset(config, files, with_metadata=True).map(
        lambda batch: (batch["image"], batch["label"])
    )
    plain = model.evaluate(unpadded, return_dict=True, verbose=0)
    unweighted = model.evaluate(data.evaluation_dataset(config, files), return_dict=True, verbose=0)
    assert padded["auc"] == pytest.approx(plain["auc"], abs=1e-6)
    assert unweighted["loss"] == pytest.approx(plain["loss"], rel=1e-5)
