"""The loopback worker pool serves EXTERNAL environments: byte-identical preprocessing.

Beam's Python job service stands in for the Flink and Spark job servers here:
the SDK workers the pool starts are the same either way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from beam_pipelines import preprocess
from engines import procs
from tests.support.files import output_files
from tests.support.runners import LOCAL_RUNNER

pytestmark = pytest.mark.slow


def test_external_workers_from_the_pool_match_local(
    synthetic_archive: Path, tmp_path: Path
) -> None:
    args = ["--metadata", str(synthetic_archive / "metadata.csv")]
    preprocess.run([*args, "--output_dir", str(tmp_path / "local"), *LOCAL_RUNNER])
    processes = procs.Processes(tmp_path / "logs")
    job_port, pool_port = procs.free_ports(2)
    try:
        processes.start(
            "job_service",
            [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main"]
            + [f"--port={job_port}"],
        )
        processes.start(
            "pool", [sys.executable, "-m", "engines.worker_pool", f"--port={pool_port}"]
        )
        processes.wait_until(
            lambda: procs.listening(job_port) and procs.listening(pool_port), "services listened"
        )
        preprocess.run(
            [*args, "--output_dir", str(tmp_path / "external"), "--runner=PortableRunner"]
            + [f"--job_endpoint=127.0.0.1:{job_port}", "--environment_type=EXTERNAL"]
            + [f"--environment_config=127.0.0.1:{pool_port}"]
        )
    finally:
        processes.stop()
    assert output_files(tmp_path / "external") == output_files(tmp_path / "local")
