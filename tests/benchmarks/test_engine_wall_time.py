"""benchmarks/engine_wall_time.py on a tiny archive: one JSON report, an entry per engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.benchmarks import loaded_script


@pytest.mark.slow
def test_main_prints_one_report_with_each_engine(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with loaded_script("engine_wall_time") as bench:
        bench.main(["--images", "6", "--engines", "local", "dask", "--workdir", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    local, dask = report["results"]
    assert local["engine"] == "local" and local["wall_seconds"] > 0
    assert local["kept"] + local["rejected"] == 6 == report["settings"]["images"]
    assert dask["engine"] == "dask" and dask["identical"] is True, dask
    assert len((tmp_path / "archive" / "metadata_6.csv").read_text().splitlines()) == 7
