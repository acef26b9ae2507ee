"""Scoring through the portable job service equals the local run (Dask: tests/engines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from beam_pipelines import score
from beam_pipelines.contracts import predictions
from tests.support.runners import LOCAL_RUNNER

pytestmark = pytest.mark.slow


def _run(archive: Path, model: Path, prefix: Path, *runner: str) -> list[dict]:
    score.run(
        [
            "--model",
            str(model / "model"),
            "--metadata",
            str(archive / "metadata.csv"),
            "--output",
            str(prefix),
            *runner,
        ]
    )
    files = sorted(str(p) for p in prefix.parent.glob(f"{prefix.name}-*.parquet"))
    rejects = (prefix.parent / "rejects" / f"{prefix.name}.jsonl").read_text()
    return [predictions.read(files).to_pylist(), rejects]


@pytest.fixture(scope="module")
def reference(synthetic_archive: Path, trained_model: Path, tmp_path_factory) -> list:
    return _run(synthetic_archive, trained_model, tmp_path_factory.mktemp("l") / "p", *LOCAL_RUNNER)


def _same(result: list, reference: list, model: Path) -> None:
    import json

    threshold = json.loads((model / "model_card.json").read_text())["operating_point"]["threshold"]
    rows, rejects = result
    assert rejects == reference[1]
    assert len(rows) == len(reference[0])
    for got, want in zip(rows, reference[0], strict=True):
        assert {k: v for k, v in got.items() if k not in ("score", "predicted")} == {
            k: v for k, v in want.items() if k not in ("score", "predicted")
        }
        assert got["score"] == pytest.approx(want["score"], abs=1e-6)
        # Last-bit differences could flip only a score within that noise of the threshold.
        if abs(want["score"] - threshold) > 1e-6:
            assert got["predicted"] == want["predicted"]


def test_portable_runner_matches_local(
    synthetic_archive, trained_model, reference, tmp_path, service
) -> None:
    port = service("apache_beam.runners.portability.local_job_service_main", "--port={port}")
    result = _run(
        synthetic_archive,
        trained_model,
        tmp_path / "p",
        "--runner=PortableRunner",
        f"--job_endpoint=localhost:{port}",
        "--environment_type=LOOPBACK",
    )
    _same(result, reference, trained_model)
