"""benchmarks/metadata_scale.py on small sizes: report structure, stdout is JSON only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.benchmarks import loaded_script

_NAME = "metadata_scale"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with loaded_script(_NAME) as module:
        yield module


def test_written_csv_has_every_broken_kind(bench: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "metadata.csv"
    expected = bench.write_metadata(path, 50, 5)
    assert expected == {kind: 2 for kind in bench.BAD_KINDS}
    assert path.read_bytes().count(b"\n") == 51


def test_run_reports_every_size_and_mode(bench: ModuleType, tmp_path: Path) -> None:
    report = bench.run(["--rows", "300,900", "--bad_every", "10", "--workdir", str(tmp_path)])

    assert [(r["size"], r["mode"]) for r in report["results"]] == [
        (300, "stream"),
        (300, "whole_file"),
        (900, "stream"),
        (900, "whole_file"),
    ]
    for result in report["results"]:
        assert result["rows"] == result["size"]
        assert result["kept"] + sum(result["rejected_by_reason"].values()) == result["size"]
        assert set(result["rejected_by_reason"]) == set(bench.BAD_KINDS)
        assert result["rows_per_s"] > 0 and result["peak_rss_mib"] >= result["baseline_rss_mib"]
    assert set(report["scaling"]) == {"stream", "whole_file"}
    assert report["scaling"]["stream"]["rows_ratio"] == 3
    json.dumps(report)


def test_main_prints_only_json(
    bench: ModuleType, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bench.main(["--rows", "100", "--modes", "stream", "--workdir", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in report["results"]] == ["stream"]
