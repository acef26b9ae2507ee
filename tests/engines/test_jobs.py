"""xray-preprocess and xray-score on the local Flink and Spark clusters equal the local run.

Shards are compared byte for byte; predictions field by field, scores to 1e-6
(as for the other runners in tests/beam_pipelines/test_score_runners.py).

Each job goes through Beam's job server jar for the engine (FlinkRunner /
SparkRunner start it) onto the real cluster, with EXTERNAL workers from the
loopback pool. Without the jar these skip and name the make target.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from beam_pipelines import preprocess, score
from beam_pipelines.contracts import predictions
from engines import procs, session, tools
from tests.support.files import output_files
from tests.support.runners import LOCAL_RUNNER

pytestmark = pytest.mark.slow


def _with_job_server(name: str):
    missing = tools.missing_job_server(name)
    return pytest.param(name, marks=pytest.mark.skipif(missing is not None, reason=str(missing)))


# Checked at collection, so a missing jar skips before any reference run.
ENGINES = [_with_job_server(name) for name in session.ENGINES]


def _preprocess(archive: Path, out: Path, runner: list[str]) -> dict[str, bytes]:
    manifest = preprocess.run(
        ["--metadata", str(archive / "metadata.csv"), "--output_dir", str(out), *runner]
    )
    assert manifest["input_rows"] == manifest["kept"] + manifest["rejected"]
    return output_files(out)


def _score(archive: Path, model: Path, prefix: Path, runner: list[str]) -> tuple[list, str]:
    score.run(
        ["--model", str(model / "model"), "--metadata", str(archive / "metadata.csv")]
        + ["--output", str(prefix), *runner]
    )
    files = sorted(str(p) for p in prefix.parent.glob(f"{prefix.name}-*.parquet"))
    rejects = (prefix.parent / "rejects" / f"{prefix.name}.jsonl").read_text()
    return predictions.read(files).to_pylist(), rejects


@pytest.fixture(scope="module")
def local_shards(synthetic_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _preprocess(synthetic_archive, tmp_path_factory.mktemp("local"), LOCAL_RUNNER)


@pytest.mark.parametrize("engine", ENGINES)
def test_preprocess_matches_local(
    engine: str,
    request: pytest.FixtureRequest,
    synthetic_archive: Path,
    local_shards: dict,
    tmp_path: Path,
) -> None:
    runner = request.getfixturevalue(engine).runner_args()
    files = _preprocess(synthetic_archive, tmp_path / "out", runner)
    assert not [name for name in files if "beam-temp" in name or ".tmp-" in name]
    assert files == local_shards


@pytest.mark.parametrize("engine", ENGINES)
def test_score_matches_local(
    engine: str,
    request: pytest.FixtureRequest,
    synthetic_archive: Path,
    trained_model: Path,
    tmp_path: Path,
) -> None:
    runner = request.getfixturevalue(engine).runner_args()
    local, local_rejects = _score(
        synthetic_archive, trained_model, tmp_path / "l" / "p", LOCAL_RUNNER
    )
    rows, rejects = _score(synthetic_archive, trained_model, tmp_path / "e" / "p", runner)
    assert rejects == local_rejects
    card = json.loads((trained_model / "model_card.json").read_text())
    threshold = card["operating_point"]["threshold"]
    assert len(rows) == len(local)
    for got, want in zip(rows, local, strict=True):
        noisy = ("score", "predicted")
        assert {k: v for k, v in got.items() if k not in noisy} == {
            k: v for k, v in want.items() if k not in noisy
        }
        # Another runner may batch images differently for the model: scores can
        # differ in the last bits, so only a score that close to the cut may flip.
        assert got["score"] == pytest.approx(want["score"], abs=1e-6)
        if abs(want["score"] - threshold) > 1e-6:
            assert got["predicted"] == want["predicted"]


def _cancel_running_jobs(flink: session.Engine) -> None:
    """Cancel what the killed submitter left on the cluster (as an operator would)."""
    base = flink.status_url.rsplit("/", 1)[0]
    for job in procs.get_json(f"{base}/jobs")["jobs"]:
        if job["status"] not in ("FINISHED", "CANCELED", "FAILED"):
            request = urllib.request.Request(f"{base}/jobs/{job['id']}?mode=cancel", method="PATCH")
            urllib.request.urlopen(request, timeout=10).close()
    deadline = time.monotonic() + 120
    while procs.get_json(flink.status_url)["jobs-running"] and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.mark.skipif(
    tools.missing_job_server("flink") is not None, reason=str(tools.missing_job_server("flink"))
)
def test_killed_flink_preprocessing_reruns_to_the_same_files(
    synthetic_archive: Path, local_shards: dict, flink: session.Engine, tmp_path: Path
) -> None:
    out, work = tmp_path / "out", tmp_path / ".out.work"
    command = [sys.executable, "-m", "beam_pipelines.preprocess"]
    command += ["--metadata", str(synthetic_archive / "metadata.csv"), "--output_dir", str(out)]
    command += flink.runner_args()
    with (tmp_path / "killed.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        running = procs.get_json(flink.status_url)["jobs-running"]
        if running and work.is_dir() and any(p.is_file() for p in work.rglob("*")):
            break
        time.sleep(0.2)
    assert process.poll() is None, "the job ended before it could be killed"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the submitter and its job server
    process.wait()
    _cancel_running_jobs(flink)
    assert not out.exists()  # nothing committed by half

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert output_files(out) == local_shards
    assert not work.exists()
