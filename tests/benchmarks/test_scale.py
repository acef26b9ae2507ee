"""benchmarks/scale.py: the independent reconciliation of a preprocessing output."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.benchmarks import loaded_script


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with loaded_script("scale") as module:
        yield module


def test_a_complete_output_reconciles(
    bench: ModuleType, synthetic_archive: Path, preprocessed: Path
) -> None:
    result = bench.reconcile(synthetic_archive, preprocessed)
    assert result["reconciled"] and result["manifest_agrees"]
    assert result["rows"] == result["kept_records"] + result["reject_lines"]
    assert result["planted_rejects"] == 8 and result["planted_rejects_wrong"] == 0


def test_a_lost_reject_is_caught(
    bench: ModuleType, synthetic_archive: Path, preprocessed: Path, tmp_path: Path
) -> None:
    damaged = tmp_path / "out"
    shutil.copytree(preprocessed, damaged)
    [rejects] = (damaged / "rejects").glob("*.jsonl")
    lines = rejects.read_text().splitlines()
    rejects.write_text("\n".join(lines[1:]) + "\n")
    result = bench.reconcile(synthetic_archive, damaged)
    assert not result["reconciled"] and not result["manifest_agrees"]
    assert result["planted_rejects_wrong"] == 1


def test_rejects_bad_arguments(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.run(["--patients", "ten"])


@pytest.mark.slow
def test_both_modes_run_side_by_side_reconcile_and_agree(bench: ModuleType, tmp_path: Path) -> None:
    report = bench.run(["--patients", "12", "--broken", "8", "--workdir", str(tmp_path)])
    [result] = report["results"]
    assert sorted(result["runs"]) == ["off", "on"]
    assert report["all_reconciled"] and report["all_identical"]
    for run in result["runs"].values():
        assert run["job"]["peak_rss_bytes"] > 0 and run["rows_per_s"] > 0
    assert report["peak_rss_ratio"] == {"on": 1.0, "off": 1.0}
