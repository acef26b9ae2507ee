"""The Keras callbacks of a training fit, resumable across a killed run.

Keras is imported lazily, inside functions: the callback classes are made by
factories when a fit asks for them, so importing this module (and
:mod:`trainer.train`) does not import Keras or TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from trainer import resume
from trainer.config import TrainConfig


def _best_weights_class() -> type:
    import keras

    class BestWeights(keras.callbacks.Callback):
        """Saves the weights of the best validation-AUC epoch, atomically.

        Keras' ModelCheckpoint writes in place, so a job killed mid-write
        leaves a corrupt file; and after ``BackupAndRestore`` it forgets the
        best score so far. This callback writes to a temporary name and
        renames, and starts from the best score of the epochs already run.
        """

        def __init__(self, path: str, best: float | None = None) -> None:
            super().__init__()
            self.path = path
            self.best = -math.inf if best is None else best

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            score = (logs or {}).get("val_auc")
            if score is None or not score > self.best:
                return
            self.best = float(score)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            temporary = f"{self.path}.tmp.weights.h5"
            self.model.save_weights(temporary)
            os.replace(temporary, self.path)

    return BestWeights


def _rng_state_class() -> type:
    import keras

    class RngState(keras.callbacks.Callback):
        """Records the model's random-generator states at each epoch's end.

        ``BackupAndRestore`` saves weights and optimizer, not the seed
        generators of layers such as dropout: a resumed run would draw the
        masks of its first epoch again. Keeps the last two epochs (the
        backup may fall back to the previous one); written atomically,
        before the backup marks the epoch done.
        """

        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            states = resume.read_rng_states(self.path)
            states[str(epoch + 1)] = {
                v.path: np.asarray(v.numpy()).tolist() for v in resume.rng_variables(self.model)
            }
            keep = sorted(states, key=int)[-2:]
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(f"{self.path}.tmp", "w") as handle:
                json.dump({k: states[k] for k in keep}, handle)
            os.replace(f"{self.path}.tmp", self.path)

    return RngState


def _val_aucs(rows: list[dict[str, str]]) -> list[float | None]:
    """Validation AUC per epoch of history rows (None where missing or NaN)."""
    values: list[float | None] = []
    for row in rows:
        try:
            value: float | None = float(row.get("val_auc") or "nan")
        except ValueError:
            value = None
        values.append(value if value is not None and math.isfinite(value) else None)
    return values


def _improves(value: float, best: float | None, min_delta: float) -> bool:
    """Whether ``value`` beats ``best`` as Keras judges a ``mode="max"`` monitor.

    Spelled out here instead of calling the callbacks' private
    ``_is_improvement``; every monitor of :func:`training_callbacks` is ``val_auc``, max.
    """
    return best is None or value - min_delta > best


def _resumable_classes() -> tuple[type, type]:
    import keras

    class ResumedEarlyStopping(keras.callbacks.EarlyStopping):
        """EarlyStopping that counts the epochs a killed run already did.

        Keras resets its counters when training (re)starts; replaying the
        validation AUCs of history.csv makes a resumed run stop when an
        uninterrupted one would.
        """

        wait: int
        best: Any
        best_epoch: int

        def __init__(self, earlier: list[float | None], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.earlier = earlier

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            super().on_train_begin(logs)
            for epoch, value in enumerate(self.earlier):
                if value is None:
                    continue
                self.wait += 1
                if _improves(value, self.best, self.min_delta):
                    self.best, self.best_epoch, self.wait = value, epoch, 0

    class ResumedReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
        """ReduceLROnPlateau that counts the epochs a killed run already did.

        The learning rate itself comes back with the optimizer's state; this
        restores the plateau counters by replaying history.csv.
        """

        wait: int
        best: Any
        cooldown_counter: int

        def __init__(self, earlier: list[float | None], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.earlier = earlier

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            super().on_train_begin(logs)
            for value in self.earlier:
                if value is None:
                    continue
                if self.in_cooldown():
                    self.cooldown_counter -= 1
                    self.wait = 0
                if _improves(value, self.best, self.min_delta):
                    self.best, self.wait = value, 0
                elif not self.in_cooldown():
                    self.wait += 1
                    if self.wait >= self.patience:  # the rate was reduced then
                        self.cooldown_counter, self.wait = self.cooldown, 0

    return ResumedEarlyStopping, ResumedReduceLROnPlateau


def training_callbacks(
    config: TrainConfig, steps_per_epoch: int, earlier: list[dict[str, str]], phase_start: int = 0
) -> list[Any]:
    """The training callbacks.

    Args:
        earlier: history rows of the epochs a resumed run (or a second phase) skips.
        phase_start: the first epoch of this fit's phase: early stopping and
            the plateau schedule count only its epochs (a frozen phase's
            epochs would otherwise end the next phase early), while the best
            weights are the best of the whole run.
    """
    import keras

    out = config.output_dir
    BestWeights = _best_weights_class()
    EarlyStopping, ReduceLROnPlateau = _resumable_classes()
    aucs = _val_aucs(earlier[phase_start:])
    # Order matters at each epoch's end: the history row and the best weights
    # are written before the backup records the epoch as done, so a kill in
    # between repeats that epoch instead of losing its row.
    callbacks: list[Any] = [
        keras.callbacks.CSVLogger(os.path.join(out, "history.csv"), append=True),
        BestWeights(
            os.path.join(out, "checkpoints", "best.weights.h5"), resume.best_val_auc(earlier)
        ),
        EarlyStopping(aucs, monitor="val_auc", mode="max", patience=config.early_stopping_patience),
        keras.callbacks.TensorBoard(os.path.join(out, "logs")),
    ]
    if config.lr_schedule == "plateau":
        callbacks.append(
            ReduceLROnPlateau(
                aucs,
                monitor="val_auc",
                mode="max",
                factor=0.5,
                patience=max(1, config.early_stopping_patience // 2),
            )
        )
    callbacks.append(_rng_state_class()(os.path.join(out, "backup", resume.RNG_STATE_FILE)))
    # double_checkpoint keeps the previous backup: a kill while the new one
    # is written leaves one that loads (see resume.usable_backup).
    callbacks.append(
        keras.callbacks.BackupAndRestore(os.path.join(out, "backup"), double_checkpoint=True)
    )
    return callbacks
