"""The trainer learns: the simple CNN finds the synthetic archive's finding."""

from __future__ import annotations

from pathlib import Path

import pytest

from archive_tools import synth
from beam_pipelines import preprocess
from tests.support.runners import LOCAL_RUNNER
from trainer import train

pytestmark = pytest.mark.slow


def test_simple_cnn_reaches_validation_auc_0_9(tmp_path: Path) -> None:
    # About 410 images at 224-256 px; 3 epochs of 100 steps take ~80 s on 2 cores.
    synth.run(
        [
            "--output_dir",
            str(tmp_path / "archive"),
            "--patients",
            "150",
            "--seed",
            "11",
            "--min_size",
            "224",
            "--max_size",
            "256",
        ]
    )
    preprocess.run(
        [
            "--metadata",
            str(tmp_path / "archive" / "metadata.csv"),
            "--output_dir",
            str(tmp_path / "pre"),
            "--split",
            "0.6,0.2,0.2",
            *LOCAL_RUNNER,
        ]
    )
    card = train.run(
        [
            "--data_dir",
            str(tmp_path / "pre"),
            "--output_dir",
            str(tmp_path / "res"),
            "--epochs",
            "3",
            "--early_stopping_patience",
            "10",
            "--seed",
            "1",
            "--verbose",
            "0",
        ]
    )
    assert card["best_val_auc"] >= 0.9, card
    # The exported best model's own validation predictions agree.
    assert card["auc"]["validation"] >= 0.9, card
