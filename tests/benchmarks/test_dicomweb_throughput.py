"""benchmarks/dicomweb_throughput.py on a tiny archive: indexing and preprocessing both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines.orthanc import orthanc_missing
from tests.support.benchmarks import BENCHMARKS, loaded_script


@pytest.mark.slow
def test_main_reports_both_sources_with_the_same_images(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = orthanc_missing()
    if missing:
        pytest.skip(missing)
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when run as a script: its folder first
    with loaded_script("dicomweb_throughput") as bench:
        bench.main(
            ["--images", "6", "--index_images", "12", "--small", "4", "--rounds", "1"]
            + ["--workdir", str(tmp_path)]
        )
    report = json.loads(capsys.readouterr().out)
    folder, dicomweb = report["index"]["folder"], report["index"]["dicomweb"]
    # Whole studies: at least as many as asked for, the same on both sides.
    assert folder["instances"] == dicomweb["instances"] >= 12
    assert folder["small_instances"] == dicomweb["small_instances"] >= 4
    assert folder["instances_per_s"] > 0 and dicomweb["instances_per_s"] > 0
    preprocessed = report["preprocess"]
    assert preprocessed["images"] >= 6 and preprocessed["identical_images"] is True
    assert preprocessed["rounds"][0]["order"] == ["folder", "dicomweb"]
    assert preprocessed["ratio"] > 0
