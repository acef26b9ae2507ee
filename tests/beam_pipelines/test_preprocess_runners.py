"""The same preprocessing on other Beam runners gives byte-identical output.

DaskRunner on a distributed.LocalCluster of worker processes, and the
portable submission path (what Flink and Spark job servers use) against
Beam's own Python job service, with LOOPBACK and EXTERNAL workers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from beam_pipelines import preprocess
from tests.beam_pipelines.conftest import output_files

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service exited early with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


@pytest.fixture
def service() -> Iterator:
    started: list[subprocess.Popen] = []

    def start(module: str, *args: str) -> int:
        port = _free_port()
        env = dict(os.environ)
        # EXTERNAL workers are started as the first `python` on PATH: ours.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        command = [sys.executable, "-m", module, *(a.format(port=port) for a in args)]
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        started.append(process)
        _wait_for_port(port, process)
        return port

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def reference(synthetic_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("local")
    preprocess.run(
        [
            "--metadata",
            str(synthetic_archive / "metadata.csv"),
            "--output_dir",
            str(out),
            "--runner=FnApiRunner",
            "--direct_running_mode=in_memory",
        ]
    )
    return output_files(out)


def _run(archive: Path, out: Path, *runner_args: str) -> dict[str, bytes]:
    preprocess.run(
        ["--metadata", str(archive / "metadata.csv"), "--output_dir", str(out), *runner_args]
    )
    files = output_files(out)
    assert not [name for name in files if "beam-temp" in name or ".tmp-" in name]
    return files


def test_dask_runner_matches_local(
    synthetic_archive: Path, reference: dict, tmp_path: Path
) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        files = _run(
            synthetic_archive,
            tmp_path / "dask",
            "--runner=DaskRunner",
            f"--dask_client_address={cluster.scheduler_address}",
        )
    assert files == reference


@pytest.mark.parametrize("environment", ["LOOPBACK", "EXTERNAL"])
def test_portable_runner_matches_local(
    synthetic_archive: Path, reference: dict, tmp_path: Path, service, environment: str
) -> None:
    job_port = service("apache_beam.runners.portability.local_job_service_main", "--port={port}")
    args = [
        "--runner=PortableRunner",
        f"--job_endpoint=localhost:{job_port}",
        f"--environment_type={environment}",
    ]
    if environment == "EXTERNAL":
        pool_port = service("apache_beam.runners.worker.worker_pool_main", "--service_port={port}")
        args.append(f"--environment_config=localhost:{pool_port}")
    assert _run(synthetic_archive, tmp_path / environment, *args) == reference
