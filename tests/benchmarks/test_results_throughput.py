"""benchmarks/results_throughput.py on a tiny archive: report structure, counts that add up.

Every variant is a whole xray-score run (~10-15 s of start-up each), so one
main() call covers them all: one round of the four variants (the PACS pair
skipped, with the reason, where Orthanc is missing) and a small in-process
micro measurement. The model is the session's trained_model (score_throughput's
test covers the benchmarks' own model cache).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from engines.orthanc import orthanc_missing
from tests.support.benchmarks import loaded_script

_NAME = "results_throughput"
_IMAGES = 3
_TINY = ["--images", str(_IMAGES), "--size", "64", "--rounds", "1", "--micro_reports", "12"]


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with loaded_script(_NAME) as module:
        yield module


@pytest.mark.slow
def test_main_prints_one_json_report_whose_counts_add_up(
    bench: ModuleType, capsys: pytest.CaptureFixture[str], tmp_path: Path, trained_model: Path
) -> None:
    model = trained_model / "model"
    bench.main([*_TINY, "--model", str(model), "--workdir", str(tmp_path)])

    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"machine", "settings", "archive", "variants", "micro", "rounds"}
    assert report["machine"]["cpus_usable"] >= 1
    assert (
        len(report["machine"]["load_avg_before"]) == len(report["machine"]["load_avg_after"]) == 3
    )
    assert report["settings"]["images"] == _IMAGES
    assert report["settings"]["size"] == [64, 64]
    assert report["settings"]["model"] == str(model)
    assert report["archive"]["params"]["encoding"] == "explicit_le"

    [only] = report["rounds"]
    variants = report["variants"]
    plain = variants["plain"]
    assert plain["ratio_to_plain"] == 1.0 and plain["extra_ms_per_image"] == 0.0
    assert only["plain"]["images"] == _IMAGES and only["plain"]["results"] is None
    assert only["plain"]["cpu_seconds_seen"] > 0 and only["plain"]["other_cpu_seconds"] >= 0
    files = only["files"]
    assert files["results"]["stored"] == files["images"] == _IMAGES
    assert files["report_files"] == _IMAGES
    missing = orthanc_missing()
    if missing:
        assert only["order"] == ["plain", "files"]
        assert variants["pacs"] == variants["pacs_rerun"] == {"skipped": missing}
    else:
        assert only["order"] == ["plain", "files", "pacs", "pacs_rerun"]
        assert only["pacs"]["results"]["stored"] == only["pacs"]["images"] == _IMAGES
        rerun = only["pacs_rerun"]["results"]
        assert rerun["already_present"] == only["pacs_rerun"]["images"] == _IMAGES
        assert rerun["stored"] == rerun["refused"] == 0
    for name, variant in variants.items():
        if "skipped" in variant:
            continue
        assert variant["counts_ok"] is True, name
        seconds = variant["wall_seconds"]
        assert seconds["n"] == 1 and seconds["min"] == seconds["median"] == seconds["max"] > 0
        assert variant["ratio_to_plain"] == pytest.approx(
            seconds["median"] / plain["wall_seconds"]["median"], abs=2e-3
        )
        assert variant["peak_rss_mib"]["median"] > 0
        assert variant["cpu_seconds_seen"]["median"] > 0

    micro = report["micro"]
    assert micro["reports"] == 12 and micro["passes"] == 1
    for way in ("build_report", "report_builder"):
        assert micro[way]["ms_per_report"]["median"] > 0
        assert micro[way]["bytes_per_report"]["min"] > 1000  # a whole Part 10 SR
    assert micro["builder_speedup"] > 0
    assert micro["same_reports_read_back"] is True


def test_rejects_bad_arguments(bench: ModuleType, tmp_path: Path) -> None:
    for bad in (
        ["--images", "0"],
        ["--rounds", "0"],
        ["--micro_reports", "0"],
        ["--size", "8"],
        ["--model", str(tmp_path)],
    ):
        with pytest.raises(SystemExit):
            bench.run(bad)


class _FakeServer:
    """OrthancServer's surface that a round uses."""

    def __init__(self, folder: Path) -> None:
        self.dicomweb_url = f"http://pacs.invalid/{folder.name}/dicom-web"

    def start(self) -> None:
        pass

    def stop(self, graceful: bool = True) -> None:
        pass


def test_odd_rounds_run_in_reverse_order_and_the_rerun_asks_the_same_server(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str, list[str]]] = []

    def fake_job(metadata: str, model: str, out: Path, extra: list[str], interval: float) -> dict:
        calls.append((out.name, list(extra)))
        return {"seconds": 1.0, "images_per_s": 1.0, "images": 1, "results": None}

    monkeypatch.setattr(bench, "run_job", fake_job)
    monkeypatch.setattr(bench, "OrthancServer", _FakeServer)
    monkeypatch.setattr(bench, "_orthanc_version", lambda server: "fake")
    args = bench._parse_args(["--images", "1", "--rounds", "2"])

    second = bench._round(args, 1, "model", "metadata.csv", tmp_path, pacs=True)

    assert second["order"] == ["pacs", "pacs_rerun", "files", "plain"]
    url = "http://pacs.invalid/orthanc/dicom-web"
    assert calls == [
        ("pacs", ["--results_to", url]),
        ("pacs_rerun", ["--results_to", url]),
        ("files", ["--results_dir", str(tmp_path / "files_reports")]),
        ("plain", []),
    ]
