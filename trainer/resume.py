"""What a killed run resumes from, in its output folder.

- ``history.csv``: the epochs already run (read, trimmed to those a resumed
  run keeps, the best validation AUC so far);
- ``backup/``: Keras' ``BackupAndRestore`` pair, made loadable or cleared,
  and ``rng_state.json`` beside it (the random-generator states the backup
  leaves out);
- weights saved with the settings that made them (a finished member, the
  end of a frozen phase), reused only under the same settings.

Keras is not imported here; the models and variables come from the caller.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from trainer.config import TrainConfig

logger = logging.getLogger(__name__)

RNG_STATE_FILE = "rng_state.json"


def read_history(out: str) -> list[dict[str, str]]:
    """The epochs history.csv holds (those of a killed run too, when resuming)."""
    path = os.path.join(out, "history.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def member_histories(out: str, members: int) -> list[list[dict[str, str]]]:
    """history.csv rows of the one model, or of each ensemble member."""
    if members == 1:
        return [read_history(out)]
    return [read_history(os.path.join(out, "members", str(k))) for k in range(members)]


def trim_history(out: str, epochs: int) -> None:
    """Keeps history.csv rows of the epochs a resumed run does not repeat."""
    rows = [r for r in read_history(out) if int(r["epoch"]) < epochs]
    path = os.path.join(out, "history.csv")
    if not rows:
        if os.path.exists(path):
            os.remove(path)
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def best_val_auc(rows: list[dict[str, str]]) -> float | None:
    """The highest validation AUC of history rows, or None when none has one."""
    values = [float(r["val_auc"]) for r in rows if r.get("val_auc") not in (None, "", "nan")]
    return max(values) if values else None


def _readable_backup(weights: str, metadata: str) -> int | None:
    """The epoch a weights + metadata pair resumes at, or None if either is unreadable."""
    import h5py

    try:
        with h5py.File(weights, "r"):
            pass
        with open(metadata) as handle:
            return int(json.load(handle)["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def usable_backup(backup_dir: str) -> int | None:
    """Makes the backup folder loadable and returns its epoch, or clears it.

    A job killed while Keras wrote its backup leaves a truncated file that
    would crash the restart. The previous pair (``*.bkp``, kept by
    ``double_checkpoint``) is used instead; with neither readable the run
    starts over rather than failing.
    """
    weights = os.path.join(backup_dir, "latest.weights.h5")
    metadata = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.isdir(backup_dir):
        return None
    epoch = _readable_backup(weights, metadata)
    if epoch is None:
        epoch = _readable_backup(f"{weights}.bkp", f"{metadata}.bkp")
        if epoch is not None:
            shutil.copyfile(f"{weights}.bkp", weights)
            shutil.copyfile(f"{metadata}.bkp", metadata)
    if epoch is None:
        logger.warning(
            "Backup in %s is unreadable (killed while writing?): starting over", backup_dir
        )
        shutil.rmtree(backup_dir, ignore_errors=True)
    return epoch


def _use_previous_backup(backup_dir: str) -> None:
    for name in ("latest.weights.h5", "training_metadata.json"):
        shutil.copyfile(os.path.join(backup_dir, f"{name}.bkp"), os.path.join(backup_dir, name))


def agreed_start(
    gather: Callable[[list[int]], list[list[int]]],
    backup_dir: str,
    done: bool,
    latest: int | None,
    frozen_done: bool,
) -> tuple[bool, int | None, bool]:
    """What every worker of a cluster resumes from: ``(done, backup epoch, frozen phase done)``.

    Each worker backs up on its own at an epoch's end, so a kill can leave
    one a backup ahead of another; the workers must restore the same epoch
    (their weights are assumed equal, never re-broadcast). The newest epoch
    all of them hold, as their latest or previous (``.bkp``) backup, is
    used; without one, all start over.

    Args:
        gather: every worker's values of a list of ints (a collective).
        backup_dir: this worker's backup, made loadable by :func:`usable_backup`.
        done, latest, frozen_done: this worker's own view.
    """
    previous = _readable_backup(
        os.path.join(backup_dir, "latest.weights.h5.bkp"),
        os.path.join(backup_dir, "training_metadata.json.bkp"),
    )
    mine = [int(done), -1 if latest is None else latest, -1 if previous is None else previous]
    rows = gather([*mine, int(frozen_done)])
    frozen = all(row[3] for row in rows)
    if all(row[0] for row in rows):
        return True, None, frozen
    epoch = min(row[1] for row in rows)
    if epoch < 0 or any(epoch not in row[1:3] for row in rows):
        if latest is not None:
            logger.warning("The workers hold no common backup epoch: starting over")
            shutil.rmtree(backup_dir, ignore_errors=True)
        return False, None, frozen
    if latest != epoch:
        logger.warning("Backup of epoch %s is ahead of a peer's: resuming at %s", latest, epoch)
        _use_previous_backup(backup_dir)
    return False, epoch, frozen


def rng_variables(model: Any) -> list[Any]:
    """The model's random-generator states (e.g. dropout's), which backups leave out."""
    return [v for v in model.variables if "seed_generator_state" in v.path]


def read_rng_states(path: str) -> dict[str, Any]:
    """The recorded random-generator states by epoch (empty when missing or unreadable)."""
    try:
        with open(path) as handle:
            return dict(json.load(handle))
    except (OSError, ValueError):
        return {}


def restore_rng_states(model: Any, backup_dir: str, epoch: int) -> bool:
    """Sets the random-generator states recorded when ``epoch`` began; False if unknown."""
    states = read_rng_states(os.path.join(backup_dir, RNG_STATE_FILE)).get(str(epoch))
    variables = rng_variables(model)
    if states is None or {v.path for v in variables} != set(states):
        return False
    for variable in variables:
        variable.assign(np.asarray(states[variable.path], dtype=variable.dtype))
    return True


def save_with(model: Any, path: str, config: TrainConfig) -> None:
    """Saves weights a later run may resume from, with the settings that made them."""
    model.save_weights(path)
    with open(f"{path}.json", "w") as handle:
        handle.write(config.to_json())


def saved_with(path: str, config: TrainConfig) -> bool:
    """True when ``path`` holds weights saved by :func:`save_with` under these settings."""
    try:
        with open(f"{path}.json") as handle:
            return os.path.exists(path) and handle.read() == config.to_json()
    except OSError:
        return False
