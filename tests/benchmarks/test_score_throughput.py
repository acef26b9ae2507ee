"""benchmarks/score_throughput.py on a tiny archive: report structure, stdout is JSON only.

Each scoring run costs ~10 s of start-up (TensorFlow and Beam imports and a
model load in every worker), so one main() call covers everything: the tiny
model's training and one pipeline run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.benchmarks import loaded_script

_NAME = "score_throughput"
_TINY = ["--images", "4", "--size", "64", "--encodings", "explicit_le", "--skip_overhead"]


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with loaded_script(_NAME) as module:
        yield module


@pytest.mark.slow
def test_main_prints_one_json_report(
    bench: ModuleType, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bench.main([*_TINY, "--workdir", str(tmp_path)])

    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"machine", "settings", "target_ratio", "results"}
    cores = report["machine"]["cpus_usable"]
    assert cores >= 1
    assert report["settings"]["size"] == [64, 64]
    assert report["settings"]["trained_here"] is True
    assert (Path(report["settings"]["model"]) / "model.keras").is_file()

    [result] = report["results"]
    assert result["encoding"] == "explicit_le"
    assert result["archive"]["params"]["images"] == 4
    [only] = result["rounds"]
    for key in ("bare_loop", "pipeline"):
        assert only[key]["images"] == 4
        assert only[key]["seconds"] > 0
        assert only[key]["images_per_s"] > 0
    assert only["bare_loop"]["cpu_per_wall"] > 0
    assert only["pipeline"]["rejected"] == 0
    assert only["pipeline"]["peak_rss_bytes"] > 0
    assert only["pipeline"]["peak_processes"] >= 1
    assert only["pipeline_overhead_run"] is None
    assert only["marginal_images_per_s"] is None
    expected = only["pipeline"]["images_per_s"] / (cores * only["bare_loop"]["images_per_s"])
    assert only["ratio"] == pytest.approx(expected, abs=2e-3)
    assert result["ratio"] == {
        "median": only["ratio"],
        "min": only["ratio"],
        "max": only["ratio"],
        "n": 1,
    }
    assert result["ratio_marginal"] is None
    assert isinstance(result["within_target"], bool)
    assert list((tmp_path / "score_runs" / "explicit_le" / "pipeline").glob("*.parquet"))


def test_rejects_bad_arguments(bench: ModuleType, tmp_path: Path) -> None:
    for bad in (
        ["--encodings", "webp"],
        ["--images", "2"],
        ["--repeats", "0"],
        ["--model", str(tmp_path)],
    ):
        with pytest.raises(SystemExit):
            bench.run(bad)
