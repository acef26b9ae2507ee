"""The same preprocessing on other Beam runners gives byte-identical output.

The portable submission path (what Flink and Spark job servers use) against
Beam's own Python job service, with LOOPBACK and EXTERNAL workers. The
DaskRunner is tested on a real dask cluster in tests/engines/test_dask.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from beam_pipelines import preprocess
from tests.support.files import output_files
from tests.support.runners import LOCAL_RUNNER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(synthetic_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("local")
    preprocess.run(
        [
            "--metadata",
            str(synthetic_archive / "metadata.csv"),
            "--output_dir",
            str(out),
            *LOCAL_RUNNER,
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
