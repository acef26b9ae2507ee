"""benchmarks/dask_wall_time.py on a tiny archive: one JSON report, both runners per round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.benchmarks import BENCHMARKS, loaded_script

pytest.importorskip("distributed", reason="dask.distributed is not installed")


@pytest.mark.slow
def test_main_reports_local_and_dask_identical(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when run as a script: its folder first
    with loaded_script("dask_wall_time") as bench:
        bench.main(["--images", "6", "--rounds", "1", "--workdir", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    (measured,) = report["rounds"]
    assert measured["order"] == ["local", "dask"]
    assert measured["dask"]["input_rows"] == measured["local"]["input_rows"] == 6
    assert report["identical"] is True and report["dask_over_local"] > 0
