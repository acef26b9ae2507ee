"""benchmarks/preprocess_throughput.py on a tiny archive: report structure, stdout is JSON only.

Each pipeline run costs ~5 s of start-up (Beam imports, worker processes), so
one main() call covers everything: 4 pipeline runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.benchmarks import loaded_script

_NAME = "preprocess_throughput"
_TINY = [
    "--images",
    "4",
    "--size",
    "64",
    "--encodings",
    "explicit_le",
    "--skip_overhead",
    "--repeat",
    "2",
    "--rounds",
    "2",
    "--memory_images",
    "2",
    "--memory_scale",
    "2",
    "--memory_size",
    "48-64",
]


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
    assert set(report) >= {"machine", "settings", "target_ratio", "results", "memory_check"}
    assert report["machine"]["cpus_usable"] >= 1
    assert report["settings"]["size"] == [64, 64]
    assert report["settings"]["bits_stored"] == 12

    [result] = report["results"]
    assert result["encoding"] == "explicit_le"
    assert result["decode"] == "fast"  # explicit LE has no reduced path: measured once
    assert "speedup_vs_full" not in result
    assert result["archive"]["params"]["images"] == 4
    assert result["archive"]["generated"] is True
    # --repeat 2: every image listed twice, as another patient through a hard link.
    assert report["settings"]["repeat"] == 2
    for key in ("bare_loop", "pipeline"):
        assert result[key]["images"] == 8
        assert result[key]["seconds"] > 0
        assert result[key]["images_per_s"] > 0
    assert result["pipeline"]["rejected"] == 0
    assert result["pipeline"]["other_cpu_seconds"] >= 0
    assert result["bare_loop"]["other_cpu_seconds"] >= 0
    assert result["bare_loop"]["steal_seconds"] >= 0 and result["pipeline"]["steal_seconds"] >= 0
    assert result["pipeline"]["peak_rss_bytes"] > 0
    assert result["pipeline"]["peak_processes"] >= 1
    assert result["pipeline_overhead_run"] is None
    assert result["marginal_images_per_s"] is None
    cores = report["machine"]["cpus_usable"]
    expected = result["pipeline"]["images_per_s"] / (cores * result["bare_loop"]["images_per_s"])
    assert result["ratio"] == pytest.approx(expected, abs=2e-3)
    assert isinstance(result["within_target"], bool)
    # --rounds 2: both rounds reported; the headline is one of them.
    assert report["settings"]["rounds"] == 2
    assert len(result["rounds"]) == 2
    # Of two rounds the headline is the lower one (never the flattering middle).
    assert result["ratio"] == min(r["ratio"] for r in result["rounds"])
    assert all(
        r["bare_images_per_s"] > 0 and r["pipeline_images_per_s"] > 0 for r in result["rounds"]
    )
    assert (tmp_path / "runs" / "explicit_le" / "bare.tfrecord.gz").is_file()
    assert (tmp_path / "runs" / "explicit_le" / "pipeline" / "manifest.json").is_file()
    splits_csv = (tmp_path / "runs" / "explicit_le" / "pipeline" / "splits.csv").read_text()
    assert len(splits_csv.strip().splitlines()) == 1 + 8  # 8 distinct patients

    memory = report["memory_check"]
    assert [r["images"] for r in memory["runs"]] == [2, 4]
    assert all(r["peak_rss_bytes"] > 0 for r in memory["runs"])
    assert memory["peak_rss_ratio"] > 0

    # A rerun reuses the cached archives.
    archive = bench.ensure_archive(tmp_path, "explicit_le", 4, (64, 64), 0)
    assert archive["generated"] is False


def test_rejects_bad_arguments(bench: ModuleType) -> None:
    for bad in (
        ["--encodings", "webp"],
        ["--images", "2"],
        ["--size", "10-5"],
        ["--repeat", "0"],
        ["--rounds", "0"],
    ):
        with pytest.raises(SystemExit):
            bench.run(bad)
