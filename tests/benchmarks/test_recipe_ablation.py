"""benchmarks/recipe_ablation.py: evaluation at the operating point and under shifts, the table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.benchmarks.conftest import loaded_script

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
    assert text.startswith("| variant | wall (min) | test AUROC")
    assert "| baseline | 1.5 |" in text and "gamma 0.6" in text
