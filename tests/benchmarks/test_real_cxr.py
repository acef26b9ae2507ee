"""benchmarks/real_cxr.py on a tiny slice of the real data: report structure, table, cache.

One main() call runs every stage once on 40 NIH images (simple CNN, one
epoch) and 40 corpus files, with Beam's in-process runner to keep worker
start-up out of the time; a second run must come entirely from the cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.benchmarks import loaded_script
from tests.support.data import SHARED_DATA

_NAME = "real_cxr"
_TINY = [
    "--datasets", "nih",
    "--models", "simple_cnn",
    "--limit", "40",
    "--epochs", "simple_cnn=1",
    "--bootstrap", "20",
    "--beam_args", "--runner=FnApiRunner --direct_running_mode=in_memory",
]  # fmt: skip

requires_data = pytest.mark.skipif(
    not (SHARED_DATA / "cxr_nih_pneumonia_dev" / "labels.csv").is_file()
    or not (SHARED_DATA / "dicom_corpus").is_dir(),
    reason="../shared/data not present",
)


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with loaded_script(_NAME) as module:
        yield module


@pytest.mark.slow
@pytest.mark.real_data
@requires_data
def test_tiny_run_reports_every_stage(
    bench: ModuleType, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    table = tmp_path / "table.md"
    argv = [*_TINY, "--workdir", str(tmp_path / "work"), "--table_out", str(table)]
    bench.main(argv)

    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"settings", "machine", "anchors", "datasets", "dicom_corpus", "errors"}
    assert report["errors"] == []
    assert report["settings"]["limit"] == 40
    assert report["anchors"]["nih"]["auc"] == 0.768
    assert report["anchors"]["kermany"]["auc"] == 0.968

    nih = report["datasets"]["nih"]
    assert nih["import"]["images"] == 40
    assert nih["import"]["abnormal"] == 20
    pre = nih["preprocess"]
    assert pre["kept"] == 40 and pre["rejected"] == 0
    assert sum(pre["images"].values()) == 40
    assert all(pre["images"][s] > 0 and pre["patients"][s] > 0 for s in pre["images"])

    record = nih["models"]["simple_cnn"]
    train = record["train"]
    assert train["epochs_run"] == 1
    assert train["images_seen"] == train["steps_per_epoch"] * 32
    assert train["seconds"] > 0 and train["cached"] is False
    score = record["score"]
    assert score["scored"] == 40 and score["rejected"] == 0
    assert score["test_rows_matched"] == score["test_rows_trainer"] == pre["images"]["test"]
    assert score["test_max_abs_score_diff"] < 1e-4
    analysis = record["analysis"]
    assert analysis["split"] == "test" and analysis["n"] == pre["images"]["test"]
    assert 0.0 <= analysis["roc_auc"] <= 1.0
    low, high = analysis["roc_auc_ci95"]
    assert low <= analysis["roc_auc"] <= high
    assert analysis["threshold"]["chosen_on"] == "validation"
    assert analysis["leakage_patients"] == 0
    assert Path(analysis["report"]).is_file()

    corpus = report["dicom_corpus"]
    assert corpus["files"] == corpus["input_rows"] == 40
    assert corpus["kept"] + corpus["rejected"] == 40
    assert sum(corpus["rejected_by_reason"].values()) == corpus["rejected"]
    assert corpus["manifest_check"]["manifest_ok_grayscale_rejected"] == []

    text = table.read_text()
    assert text == bench.markdown_table(report)
    assert "| nih | simple_cnn |" in text
    assert "0.768 (CheXNet)" in text
    assert "| reject reason | files |" in text

    # Every stage is cached now: a rerun does no work and reports the same figures.
    again = bench.run(argv)
    stages = [again["dicom_corpus"], again["datasets"]["nih"]["import"]]
    stages += list(again["datasets"]["nih"]["models"]["simple_cnn"].values())
    assert all(stage["cached"] for stage in stages)
    assert (
        again["datasets"]["nih"]["models"]["simple_cnn"]["analysis"]["roc_auc"]
        == (analysis["roc_auc"])
    )


def test_budget_and_subset_helpers(bench: ModuleType) -> None:
    budget = bench._model_budget("simple_cnn=20,densenet121=4,densenet121@kermany=2")
    assert bench._budget_for(budget, "densenet121", "kermany", 10) == 2
    assert bench._budget_for(budget, "densenet121", "nih", 10) == 4
    assert bench._budget_for({}, "simple_cnn", "nih", 10) == 10

    rows = [{"label": label, "i": str(i)} for i, label in enumerate("nnnnnaa")]
    subset = bench.balanced_subset(rows, 4)
    assert [r["i"] for r in subset] == ["0", "1", "5", "6"]
    assert len(bench.balanced_subset(rows, 100)) == len(rows)


def test_rejects_bad_arguments(bench: ModuleType) -> None:
    for bad in (
        ["--models", "vgg16"],
        ["--datasets", "chexpert"],
        ["--epochs", "resnet50=3"],
        ["--steps_per_epoch", "densenet121=x"],
        ["--split", "0.8,0.2,0"],
        ["--score_models", "vgg"],
    ):
        with pytest.raises(SystemExit):
            bench.run(bad)
