"""Training on several hosts: two worker processes on localhost ports (MWMS)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beam_pipelines.contracts import predictions
from tests.support.runners import free_port

ARGS = ("--global_batch_size", "8", "--steps_per_epoch", "3", "--verbose", "2", "--seed", "0")


def _tf_config(ports: list[int], index: int) -> str:
    workers = [f"localhost:{port}" for port in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def _start_cluster(data: Path, out: Path, *args: str) -> list[subprocess.Popen]:
    """Worker 0 (the chief) and worker 1, each a fresh process (collectives are set at start)."""
    ports = [free_port(), free_port()]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "trainer.train", "--data_dir", str(data)]
            + ["--output_dir", str(out), *ARGS, *args],
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": _tf_config(ports, i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for i in range(2)
    ]


def _finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outputs = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                os.killpg(other.pid, signal.SIGKILL)
            raise
        assert process.returncode == 0, output[-4000:]
        outputs.append(output)
    return outputs


def _epochs(out: Path) -> list[int]:
    with (out / "history.csv").open() as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def _assert_complete(out: Path, data: Path, epochs: int) -> None:
    """The chief's outputs, every validation and test record predicted, nothing of the worker."""
    for name in ("model/saved_model.pb", "model/model.keras", "model_card.json", "config.json"):
        assert (out / name).exists(), name
    assert _epochs(out) == list(range(epochs))
    card = json.loads((out / "model_card.json").read_text())
    assert card["replicas"] == 2 and card["epochs_run"] == epochs
    manifest = json.loads((data / "manifest.json").read_text())
    for split in ("validation", "test"):
        table = predictions.read(str(out / "predictions" / f"{split}.parquet"))
        assert table.num_rows == sum(manifest["counts"][split].values())
        assert len(set(table.column("dicom_path").to_pylist())) == table.num_rows
    assert not (out / "backup").exists()
    # The worker wrote only into its own folder beside the output, removed at the end.
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")) == [
        f".{out.name}.lock"
    ]


@pytest.mark.slow
def test_two_workers_train_and_only_the_chief_writes(preprocessed: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    chief, worker = _finish(_start_cluster(preprocessed, out, "--epochs", "2"))
    _assert_complete(out, preprocessed, epochs=2)
    assert "worker-0 of 2 workers (chief" in chief
    assert "auto-shard by DATA" in chief  # one training shard, two workers
    assert "worker-1 done; the chief wrote the results" in worker


def test_malformed_tf_config_is_refused_in_one_line(preprocessed: Path, tmp_path: Path) -> None:
    for config in ('{"cluster": ', '{"cluster": {"worker": ["a:1", "b:2"]}}'):
        result = subprocess.run(
            [sys.executable, "-m", "trainer.train", "--data_dir", str(preprocessed)]
            + ["--output_dir", str(tmp_path / "out")],
            env={**os.environ, "TF_CONFIG": config},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("xray-train: error: TF_CONFIG: ")
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ("[1]", 'needs a "cluster"'),
        ('{"cluster": {"ps": ["a:1"], "worker": ["b:2"]}}', "'ps' tasks"),
        ('{"cluster": {"worker": ["a", "b:2"]}}', "not host:port"),
        (
            '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
            "outside",
        ),
        ('{"cluster": {"chief": ["a:1", "c:3"], "worker": ["b:2"]}}', "more than one chief"),
    ],
)
def test_cluster_task_names_what_is_wrong(config: str, problem: str) -> None:
    from trainer.strategy import cluster_task

    with pytest.raises(ValueError, match=problem):
        cluster_task(config)


def test_cluster_task_finds_the_chief() -> None:
    from trainer.strategy import cluster_task

    assert cluster_task("") is None
    assert cluster_task('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker"}}') is None
    workers = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}
    task = cluster_task(json.dumps(workers))
    assert task is not None and task.is_chief and task.workers == 2
    with_chief = {
        "cluster": {"chief": ["c:0"], "worker": ["a:1", "b:2"]},
        "task": {"type": "worker", "index": 0},
    }
    task = cluster_task(json.dumps(with_chief))
    assert task is not None and not task.is_chief and task.workers == 3
    assert task.name == "worker-0"


@pytest.mark.slow
def test_a_killed_worker_restarted_with_its_peer_resumes(
    preprocessed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    backups = [
        tmp_path / ".results.work" / "backup",
        tmp_path / ".results.workers" / "worker-1" / "backup",
    ]
    args = ("--epochs", "3", "--steps_per_epoch", "6")
    chief, worker = _start_cluster(preprocessed, out, *args)
    deadline = time.monotonic() + 240
    # Kill hard once both hold the first epoch's backup, during the next epoch.
    while not all(list(b.rglob("*.h5")) for b in backups) and time.monotonic() < deadline:
        assert chief.poll() is None and worker.poll() is None, chief.communicate()[0][-3000:]
        time.sleep(0.1)
    time.sleep(0.5)
    os.killpg(worker.pid, signal.SIGKILL)
    # The cluster manager restarts the whole job: the chief goes too.
    os.killpg(chief.pid, signal.SIGKILL)
    chief.wait(), worker.wait()
    done = _epochs(tmp_path / ".results.work")
    assert done and done[-1] < 2, "the first run finished before it could be killed"
    assert not out.exists()

    chief_log, _ = _finish(_start_cluster(preprocessed, out, *args))
    assert "Resuming simple_cnn at epoch" in chief_log
    _assert_complete(out, preprocessed, epochs=3)  # no epoch repeated or lost


@pytest.mark.slow
def test_two_workers_train_as_two_replicas_on_one_host(preprocessed: Path, tmp_path: Path) -> None:
    """Same global batch and seed: the cluster and --logical_cpus 2 train the same steps."""
    args = ("--epochs", "2", "--deterministic", "true")
    _finish(_start_cluster(preprocessed, tmp_path / "cluster", *args))
    one_host = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--data_dir", str(preprocessed)]
        + ["--output_dir", str(tmp_path / "host"), *ARGS, *args, "--logical_cpus", "2"],
        env={k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
        | {"TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one_host.returncode == 0, one_host.stdout[-2000:] + one_host.stderr[-2000:]
    for split in ("validation", "test"):
        cluster, host = (
            predictions.read(str(tmp_path / run / "predictions" / f"{split}.parquet")).to_pydict()
            for run in ("cluster", "host")
        )
        assert cluster["dicom_path"] == host["dicom_path"]
        assert cluster["score"] == pytest.approx(host["score"], abs=1e-5)
    histories = [
        list(csv.DictReader((tmp_path / run / "history.csv").open())) for run in ("cluster", "host")
    ]
    for cluster_epoch, host_epoch in zip(*histories, strict=True):
        assert float(cluster_epoch["loss"]) == pytest.approx(float(host_epoch["loss"]), abs=1e-5)
