"""The training callbacks: their counters resumed from history.csv, and no Keras at import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trainer.config import TrainConfig


def test_importing_the_training_job_imports_neither_keras_nor_tensorflow() -> None:
    # A fresh process: this one has imported them already.
    code = (
        "import sys, trainer.train, trainer.callbacks; "
        "print(sorted({'keras', 'tensorflow'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_second_phase_counts_its_own_epochs_for_early_stopping() -> None:
    from trainer.callbacks import training_callbacks

    config = TrainConfig(
        data_dir="d", output_dir="o", epochs=8, freeze_epochs=3, early_stopping_patience=2
    )
    frozen_phase = [{"epoch": str(e), "val_auc": str(0.9 - 0.1 * e)} for e in range(3)]
    second = training_callbacks(config, 2, frozen_phase, phase_start=3)
    plain = training_callbacks(config, 2, frozen_phase)
    for callbacks, wait in ((second, 0), (plain, 2)):
        stopping = next(c for c in callbacks if type(c).__name__ == "ResumedEarlyStopping")
        stopping.on_train_begin()
        assert stopping.wait == wait
    best = next(c for c in second if type(c).__name__ == "BestWeights")
    assert best.best == pytest.approx(0.9)  # the best weights are the whole run's


def test_the_plateau_schedule_replays_history_as_keras_counts_it() -> None:
    from trainer.callbacks import training_callbacks

    config = TrainConfig(data_dir="d", output_dir="o", early_stopping_patience=6)
    # Keras' ReduceLROnPlateau needs a gain above min_delta (1e-4) to reset its wait.
    history = [{"val_auc": v} for v in ("0.8", "0.80005", "0.79", "nan")]
    plateau = next(
        c
        for c in training_callbacks(config, 2, history)
        if type(c).__name__ == "ResumedReduceLROnPlateau"
    )
    plateau.on_train_begin()
    assert (plateau.best, plateau.wait, plateau.cooldown_counter) == (0.8, 2, 0)
