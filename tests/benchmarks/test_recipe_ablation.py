"""benchmarks/recipe_ablation.py: evaluation at the operating point and under shifts, the table."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.benchmarks import loaded_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with loaded_script("recipe_ablation") as module:
        yield module


def test_evaluation_reports_the_operating_point_and_every_shift(
    bench: ModuleType, trained_model: Path, preprocessed: Path
) -> None:
    from trainer import shifts

    figures = bench.evaluate(trained_model, preprocessed)
    assert figures["test_images"] > 0
    assert 0.0 <= figures["auroc"] <= 1.0
    assert 0.0 <= figures["accuracy_at_operating_point"] <= 1.0
    assert set(figures["shifted_auroc"]) == set(shifts.ROBUSTNESS_SHIFTS)
    assert figures["worst_shifted_auroc"] == min(figures["shifted_auroc"].values())
    report = {"variants": {"baseline": {"wall_s": 90.0, **figures}}}
    text = bench.table(report)
    assert text.startswith("| variant | wall (min) | whole path (min) | test AUROC")
    assert "| baseline | 1.5 | n/a |" in text and "gamma 0.6" in text


def test_whole_path_scores_the_test_patients_dicom_files_with_xray_score(
    bench: ModuleType,
    trained_model: Path,
    preprocessed: Path,
    synthetic_archive: Path,
    tmp_path: Path,
) -> None:
    import csv

    scored = bench.score_test_images(trained_model, preprocessed, synthetic_archive, tmp_path)
    manifest = json.loads((preprocessed / "manifest.json").read_text())
    assert scored["scored_images"] == sum(manifest["counts"]["test"].values())
    assert 0.0 <= scored["scored_auroc"] <= 1.0 and 0.0 <= scored["scored_accuracy"] <= 1.0
    assert scored["score_wall_s"] > 0
    with (preprocessed / "splits.csv").open() as handle:
        test = {r["PatientID"] for r in csv.DictReader(handle) if r["split"] == "test"}
    with (tmp_path / "test_metadata.csv").open() as handle:
        assert {r["PatientID"] for r in csv.DictReader(handle)} <= test


def test_later_ids_pins_each_id_familys_highest_numbers_to_test(
    bench: ModuleType, tmp_path: Path
) -> None:
    metadata = tmp_path / "metadata.csv"
    patients = [f"person{n}" for n in range(1, 21)] + [f"IM-{n:04d}" for n in (5, 40, 300, 7)]
    rows = ["PatientID,DicomPath,Abnormal"] + [f"{p},{p}.dcm,false" for p in patients + ["anon"]]
    metadata.write_text("\n".join(rows) + "\n")
    pins = tmp_path / "splits.csv"
    assert bench.later_ids(metadata, pins, fraction=0.15) == 4
    lines = pins.read_text().splitlines()
    assert lines[0] == "PatientID,split"
    # person18-20 (3 of 20), IM-0300 (1 of 4; numbers, not text, order them); anon has no number
    assert lines[1:] == ["IM-0300,test", "person18,test", "person19,test", "person20,test"]
