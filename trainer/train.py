"""Training job: ``xray-train --data_dir PREPROCESSED --output_dir RESULTS [...]``.

Streams the preprocessed shards into a CNN under the strategy from
:mod:`trainer.strategy`, stops early on validation AUC, keeps the best
weights, resumes a killed run from its backup, and writes to ``RESULTS/``:

- ``model/``: the SavedModel (serving signature: 224x224x1 [0,1] image ->
  probability of abnormal) with ``model.keras`` beside it;
- ``history.csv``, ``config.json`` (the resolved configuration),
  ``model_card.json`` (data manifest digest, metrics, versions);
- ``predictions/{validation,test}.parquet`` in the predictions contract;
- ``logs/`` (TensorBoard) and, while running, ``backup/`` and ``checkpoints/``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np

from beam_pipelines.cli import main as cli_main
from beam_pipelines.cli import refuse
from beam_pipelines.storage.committer import open_output
from trainer.config import TrainConfig, load_config

logger = logging.getLogger(__name__)

SPLITS_TO_PREDICT = ("validation", "test")


class TrainingDataError(RuntimeError):
    """The preprocessed data cannot be trained on (a damaged shard, …); the message says why."""


def _read_manifest(data_dir: str) -> tuple[dict[str, Any], bytes]:
    """The manifest (parsed, raw); ValueError with a one-line reason when unusable."""
    import tensorflow as tf

    path = f"{data_dir.rstrip('/')}/manifest.json"
    if not tf.io.gfile.exists(path):
        raise ValueError(f"{path} not found: is --data_dir a preprocessed output?")
    with tf.io.gfile.GFile(path, "rb") as handle:
        raw = handle.read()
    try:
        manifest = json.loads(raw)
        manifest["counts"]["train"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a preprocessing manifest ({exc})") from exc
    return manifest, raw


def check_training_data(data_dir: str, manifest: dict[str, Any]) -> dict[str, list[str]]:
    """The shard files of train and validation, checked against the manifest before any work.

    Raises:
        ValueError: a split has no images or no shards, or its shards are not
            the ones the manifest lists (a folder mixed by hand).
    """
    from trainer import data

    listed = set(manifest.get("files", {}).get("shards", []))
    files: dict[str, list[str]] = {}
    for split in ("train", "validation"):
        images = sum(manifest["counts"].get(split, {}).values())
        if images == 0:
            raise ValueError(
                f"the {split} split of {data_dir} has no images (manifest counts): "
                "preprocess with more patients or a larger --split ratio for it"
            )
        try:
            files[split] = data.shard_files(data_dir, split)
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from exc
        if listed:
            found, expected = set(data.found_shards(data_dir, split)), set(files[split])
            if found != expected:
                odd = sorted(found ^ expected)
                raise ValueError(
                    f"the {split} shards in {data_dir} are not the ones its manifest lists "
                    f"({', '.join(odd[:3])}): re-run xray-preprocess into it"
                )
    return files


def _find_damaged_shard(files: list[str]) -> str | None:
    """The first shard that does not read to its end, with the reason, or None."""
    import tensorflow as tf

    for path in files:
        try:
            for _ in tf.data.TFRecordDataset(path, compression_type="GZIP"):
                pass
        except tf.errors.OpError as exc:
            return f"{path} ({exc.message.splitlines()[0][:200]})"
    return None


def class_weights(manifest: dict[str, Any]) -> dict[int, float] | None:
    """Inverse-frequency class weights from the training counts (mean weight 1)."""
    counts = manifest["counts"]["train"]
    normal, abnormal = counts["normal"], counts["abnormal"]
    if not normal or not abnormal:
        return None
    total = normal + abnormal
    return {0: total / (2.0 * normal), 1: total / (2.0 * abnormal)}


def _history(out: str) -> list[dict[str, str]]:
    """The epochs history.csv holds (those of a killed run too, when resuming)."""
    path = os.path.join(out, "history.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


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


def _usable_backup(backup_dir: str) -> int | None:
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


def _trim_history(out: str, epochs: int) -> None:
    """Keeps history.csv rows of the epochs a resumed run does not repeat."""
    rows = [r for r in _history(out) if int(r["epoch"]) < epochs]
    path = os.path.join(out, "history.csv")
    if not rows:
        if os.path.exists(path):
            os.remove(path)
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _best(rows: list[dict[str, str]], key: str = "val_auc") -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "", "nan")]
    return max(values) if values else None


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


RNG_STATE_FILE = "rng_state.json"


def _rng_variables(model: Any) -> list[Any]:
    """The model's random-generator states (e.g. dropout's), which backups leave out."""
    return [v for v in model.variables if "seed_generator_state" in v.path]


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
            states = _read_rng_states(self.path)
            states[str(epoch + 1)] = {
                v.path: np.asarray(v.numpy()).tolist() for v in _rng_variables(self.model)
            }
            keep = sorted(states, key=int)[-2:]
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(f"{self.path}.tmp", "w") as handle:
                json.dump({k: states[k] for k in keep}, handle)
            os.replace(f"{self.path}.tmp", self.path)

    return RngState


def _read_rng_states(path: str) -> dict[str, Any]:
    try:
        with open(path) as handle:
            return dict(json.load(handle))
    except (OSError, ValueError):
        return {}


def _restore_rng_states(model: Any, backup_dir: str, epoch: int) -> bool:
    """Sets the random-generator states recorded when ``epoch`` began; False if unknown."""
    states = _read_rng_states(os.path.join(backup_dir, RNG_STATE_FILE)).get(str(epoch))
    variables = _rng_variables(model)
    if states is None or {v.path for v in variables} != set(states):
        return False
    for variable in variables:
        variable.assign(np.asarray(states[variable.path], dtype=variable.dtype))
    return True


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
    ``_is_improvement``; every monitor of :func:`_callbacks` is ``val_auc``, max.
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


def _callbacks(
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
        BestWeights(os.path.join(out, "checkpoints", "best.weights.h5"), _best(earlier)),
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
    callbacks.append(_rng_state_class()(os.path.join(out, "backup", RNG_STATE_FILE)))
    # double_checkpoint keeps the previous backup: a kill while the new one
    # is written leaves one that loads (see _usable_backup).
    callbacks.append(
        keras.callbacks.BackupAndRestore(os.path.join(out, "backup"), double_checkpoint=True)
    )
    return callbacks


def _optimizer(config: TrainConfig, steps_per_epoch: int) -> Any:
    """Adam or AdamW; a constant rate (for the plateau schedule) or cosine decay after warm-up."""
    import keras

    if config.lr_schedule == "cosine":
        warmup = config.warmup_epochs * steps_per_epoch
        rate: Any = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else config.learning_rate,
            decay_steps=max(1, config.epochs * steps_per_epoch - warmup),
            warmup_target=config.learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    else:
        rate = config.learning_rate
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=config.weight_decay)
    return keras.optimizers.Adam(rate)


def _model_id(config: TrainConfig, manifest_bytes: bytes) -> str:
    digest = hashlib.sha256(manifest_bytes + config.to_json().encode()).hexdigest()
    return f"{config.model}-{digest[:12]}"


def predict_split(model: Any, config: TrainConfig, split: str, model_id: str) -> dict[str, list]:
    """Scores one split in record order; returns columns of the predictions contract."""
    from trainer import data

    columns: dict[str, list] = {
        key: []
        for key in ("dicom_path", "patient_id", "study_id", "view_position", "age", "sex", "label")
    }
    scores: list[float] = []
    for batch in data.evaluation_dataset(config, data.shard_files(config.data_dir, split), True):
        # A direct call, outside the strategy: any batch size, no replica split.
        scores.extend(np.asarray(model(batch["image"], training=False)).reshape(-1).tolist())
        for key in ("dicom_path", "patient_id", "study_id", "view_position", "sex"):
            columns[key].extend(v.decode("utf-8") for v in batch[key].numpy())
        columns["age"].extend(int(a) if a >= 0 else None for a in batch["age"].numpy())
        columns["label"].extend(int(v) for v in batch["label"].numpy())
    columns["sex"] = [s or None for s in columns["sex"]]
    columns["view_position"] = [v or None for v in columns["view_position"]]
    return {
        **columns,
        "split": [split] * len(scores),
        "score": scores,
        "model_id": [model_id] * len(scores),
    }


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs training; returns the model card.

    Preflight (exit 2, one line): the manifest, the train and validation
    shards, the output location and its lock. The run writes into the
    output's work folder (where a killed run's backup is resumed from) and
    replaces the previous results only once the model card is written.
    """
    config = load_config(argv)
    try:
        manifest, manifest_bytes = _read_manifest(config.data_dir)
        shards = check_training_data(config.data_dir, manifest)
    except ValueError as exc:
        refuse("xray-train", f"--data_dir {config.data_dir}: {exc}")
    problem = _starting_point_problem(config)
    if problem:
        refuse("xray-train", problem)
    output = open_output(
        "--output_dir",
        config.output_dir,
        "xray-train",
        resume=True,
        inputs=(config.data_dir,),
    )
    with output:
        card = _train(
            config,
            dataclasses.replace(config, output_dir=output.work),
            manifest,
            manifest_bytes,
            shards,
        )
        output.commit(last="model_card.json")
    logger.info("Model %s written to %s; AUC %s", card["model_id"], config.output_dir, card["auc"])
    return card


def _train(
    config: TrainConfig,
    work_config: TrainConfig,
    manifest: dict[str, Any],
    manifest_bytes: bytes,
    shards: dict[str, list[str]],
) -> dict[str, Any]:
    """Trains into ``work_config.output_dir`` (the work folder); returns the model card."""
    from trainer.strategy import make_strategy

    # Logical devices must be configured before anything else touches TF.
    strategy = make_strategy(config.logical_cpus)

    import keras
    import tensorflow as tf

    from beam_pipelines.contracts import operating_point, predictions
    from trainer import data

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")

    out = work_config.output_dir
    with open(os.path.join(out, "config.json"), "w") as handle:
        handle.write(config.to_json())
    if config.ensemble > 1 and os.path.exists(os.path.join(out, "history.csv")):
        os.remove(os.path.join(out, "history.csv"))  # each member keeps its own

    members = []
    for k in range(config.ensemble):
        if config.ensemble == 1:
            member, member_out = config, out
        else:  # members/k: its own history, checkpoints and backup
            member_out = os.path.join(out, "members", str(k))
            member = dataclasses.replace(config, seed=config.seed + k)
            os.makedirs(member_out, exist_ok=True)
        members.append(
            _fit_member(
                member,
                dataclasses.replace(member, output_dir=member_out),
                strategy,
                manifest,
                shards,
                name=config.model if config.ensemble == 1 else f"{config.model}_member{k}",
            )
        )
    model = members[0] if len(members) == 1 else _average(members, config)

    model_dir = os.path.join(out, "model")
    shutil.rmtree(model_dir, ignore_errors=True)
    model.export(model_dir, verbose=False)  # SavedModel with a serving signature
    model.save(os.path.join(model_dir, "model.keras"))

    model_id = _model_id(config, manifest_bytes)
    metrics: dict[str, Any] = {}
    os.makedirs(os.path.join(out, "predictions"), exist_ok=True)
    predicted: dict[str, dict[str, list]] = {}
    for split in SPLITS_TO_PREDICT:
        try:
            split_files = data.shard_files(config.data_dir, split)
        except FileNotFoundError:
            logger.warning("No %s shards: no %s predictions", split, split)
            continue
        with _naming_damaged_shards(split_files):
            predicted[split] = predict_split(model, config, split, model_id)
        metrics[split] = _auc(predicted[split]["label"], predicted[split]["score"])
    point = _operating_point(predicted["validation"], config.operating_point)
    if point is not None:
        operating_point.write(model_dir, point)
    for split, columns in predicted.items():
        columns["predicted"] = operating_point.predicted(columns["score"], point)
        predictions.write(os.path.join(out, "predictions", f"{split}.parquet"), columns, point)
    epochs = _member_histories(out, config.ensemble)
    card = {
        "model_id": model_id,
        "model": config.model,
        "data": {
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "schema_version": manifest.get("schema_version"),
            "counts": manifest.get("counts"),
        },
        # From history.csv: it spans a killed run and its resumption.
        "epochs_run": sum(len(h) for h in epochs),
        "best_val_auc": _best(epochs[0]) if len(epochs) == 1 else metrics.get("validation"),
        "ensemble": (
            None
            if config.ensemble == 1
            else {"members": config.ensemble, "member_best_val_auc": [_best(h) for h in epochs]}
        ),
        "auc": metrics,
        "operating_point": point,
        "replicas": strategy.num_replicas_in_sync,
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    }
    with open(os.path.join(out, "model_card.json"), "w") as handle:
        json.dump(card, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return card


def _fit_member(
    config: TrainConfig,
    work_config: TrainConfig,
    strategy: Any,
    manifest: dict[str, Any],
    shards: dict[str, list[str]],
    name: str,
) -> Any:
    """Trains one model into ``work_config.output_dir`` (resumable); returns it, best weights.

    A member that finished before a kill (its ``member.weights.h5`` written)
    is loaded instead of trained again.
    """
    import keras

    from trainer import data

    keras.utils.set_random_seed(config.seed)
    out = work_config.output_dir
    finished = os.path.join(out, "member.weights.h5")
    done = _saved_with(finished, config)
    resume_epoch = None if done else _usable_backup(os.path.join(out, "backup"))
    # Keras deletes the backup when a fit ends: the frozen phase leaves its own
    # end state, so a kill early in the second phase does not start over.
    frozen_end = os.path.join(out, "frozen_phase.weights.h5")
    frozen_done = bool(config.freeze_epochs) and _saved_with(frozen_end, config)
    start = resume_epoch or (config.freeze_epochs if frozen_done and not done else 0)
    if not done:
        _trim_history(out, start)  # a fresh run starts a fresh history
    train_files, validation_files = shards["train"], shards["validation"]
    train_count = sum(manifest["counts"]["train"].values())
    steps_per_epoch = steps_in_epoch(config, train_count)
    stats = manifest.get("train_pixel_stats") or {}
    weights = class_weights(manifest) if config.class_weights == "manifest" else None
    logger.info(
        "Training %s on %d images (%d steps/epoch, batch %d, %d replicas), class weights %s",
        name,
        train_count,
        steps_per_epoch,
        config.global_batch_size,
        strategy.num_replicas_in_sync,
        weights,
    )
    with strategy.scope():
        model = _initial_model(config, name, stats)
        _compile(model, config, steps_per_epoch, frozen=config.freeze_epochs > 0)
    if done:  # trained to the end before an interruption, with these settings
        model.load_weights(finished)
        return model
    if resume_epoch is not None and not _restore_rng_states(
        model, os.path.join(out, "backup"), resume_epoch
    ):
        logger.warning(
            "No random-generator state for epoch %s: dropout masks restart", resume_epoch
        )
    if resume_epoch is None and start:  # the frozen phase ended before a kill
        model.load_weights(frozen_end)
    # With --freeze_epochs N: the first N epochs train the output layer alone
    # (a pretrained backbone keeps its filters while the head settles), then
    # everything; each phase is one fit, resumable like a plain run.
    phases = [(config.freeze_epochs, True)] if config.freeze_epochs else []
    phases.append((config.epochs, False))
    for end, frozen in phases:
        if start >= end:
            continue
        if not frozen and config.freeze_epochs:
            with strategy.scope():
                _compile(model, config, steps_per_epoch, frozen=False)
            # The learning-rate schedule goes on from the frozen phase's last
            # step instead of warming up again (a resumed run's backup restores it).
            model.optimizer.iterations.assign(config.freeze_epochs * steps_per_epoch)
        with _naming_damaged_shards([*train_files, *validation_files]):
            model.fit(
                # The batches the finished epochs trained on are skipped, so a
                # resumed run sees the very batches an uninterrupted one would.
                data.training_dataset(config, train_files, start * steps_per_epoch),
                validation_data=data.evaluation_dataset(
                    config, validation_files, pad=strategy.num_replicas_in_sync > 1
                ),
                initial_epoch=start,
                epochs=end,
                steps_per_epoch=steps_per_epoch,
                class_weight=weights,
                callbacks=_callbacks(
                    work_config,
                    steps_per_epoch,
                    _history(out) if start else [],
                    phase_start=0 if frozen else config.freeze_epochs,
                ),
                verbose=config.verbose,
            )
        if frozen:
            _save_with(model, frozen_end, config)
        start = end
    best = os.path.join(out, "checkpoints", "best.weights.h5")
    if os.path.exists(best):
        model.load_weights(best)
    _save_with(model, finished, config)  # a run resumed after a kill skips this member
    return model


def steps_in_epoch(config: TrainConfig, train_count: int) -> int:
    """Batches per epoch: ``steps_per_epoch``, else one pass of at least ``min_steps_per_epoch``."""
    return config.steps_per_epoch or max(
        1, config.min_steps_per_epoch, math.ceil(train_count / config.global_batch_size)
    )


def _starting_point_problem(config: TrainConfig) -> str | None:
    """Why --weights or --init_model cannot be used, checked before any work (or None).

    ImageNet weights are fetched here once (then read from the Keras cache).
    """
    from beam_pipelines.storage.files import input_file_problem
    from beam_pipelines.transforms.inference import model_file_problem

    if config.init_model:
        problem = model_file_problem(config.init_model)
        return f"--init_model {config.init_model}: {problem}" if problem else None
    if config.weights == "imagenet":
        from trainer.models import WeightsUnavailable, backbone

        try:
            backbone(config.model, "imagenet")
        except WeightsUnavailable as exc:
            return f"--weights imagenet: {exc}"
    elif config.weights != "none":
        problem = input_file_problem(config.weights)
        return f"--weights {config.weights}: {problem}" if problem else None
    return None


def _initial_model(config: TrainConfig, name: str, stats: dict[str, Any]) -> Any:
    """A fresh model (random or pretrained backbone), or the model given to fine-tune."""
    import keras

    from trainer.models import build_model

    if config.init_model:
        # Its standardization stays: the filters were learnt on that input.
        path = os.path.join(config.init_model, "model.keras")
        return keras.saving.load_model(path, safe_mode=True)
    return build_model(
        config.model,
        model_name=name,
        pixel_mean=stats.get("mean") or 0.5,
        pixel_std=stats.get("std") or 0.25,
        weights=None if config.weights == "none" else config.weights,
    )


def _compile(model: Any, config: TrainConfig, steps_per_epoch: int, frozen: bool) -> None:
    """Compiles for training; ``frozen`` trains the output layer alone."""
    import keras

    _set_trainable(model, frozen)
    model.compile(
        optimizer=_optimizer(config, steps_per_epoch),
        # Divides by the weights' sum, not the batch size: evaluation padding
        # (weight 0) then leaves the loss unchanged.
        loss=keras.losses.BinaryCrossentropy(
            label_smoothing=config.label_smoothing, reduction="mean_with_sample_weight"
        ),
        # Weighted, so the zero-weight padding of evaluation batches counts for
        # nothing (training metrics then follow the class weights).
        weighted_metrics=[
            keras.metrics.AUC(name="auc"),
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
        jit_compile=config.xla,
    )


def _set_trainable(model: Any, frozen: bool) -> None:
    """Everything trainable, or (frozen) only the output layers, also inside ensemble members."""
    import keras

    model.trainable = True
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _set_trainable(layer, frozen)
        else:
            layer.trainable = not frozen or (layer.name == "abnormal" and bool(layer.weights))


def _average(members: list[Any], config: TrainConfig) -> Any:
    """One model whose output is the mean of the members' probabilities."""
    import keras

    from beam_pipelines.contracts import records

    inputs = keras.Input(shape=records.IMAGE_SHAPE, name="image")
    outputs = keras.layers.Average(name="abnormal", dtype="float32")(
        [member(inputs) for member in members]
    )
    return keras.Model(inputs, outputs, name=f"{config.model}_ensemble{len(members)}")


@contextlib.contextmanager
def _naming_damaged_shards(files: list[str]) -> Iterator[None]:
    """Turns TensorFlow's anonymous read error on a damaged shard into one naming it.

    No record is ever skipped: a damaged shard stops the run, and the user
    re-runs preprocessing (or removes the shard knowingly).
    """
    import tensorflow as tf

    try:
        yield
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as exc:
        damaged = _find_damaged_shard(files)
        if damaged is None:
            raise
        raise TrainingDataError(
            f"shard {damaged} is damaged; no record was skipped: re-run xray-preprocess"
        ) from exc


def _save_with(model: Any, path: str, config: TrainConfig) -> None:
    """Saves weights a later run may resume from, with the settings that made them."""
    model.save_weights(path)
    with open(f"{path}.json", "w") as handle:
        handle.write(config.to_json())


def _saved_with(path: str, config: TrainConfig) -> bool:
    """True when ``path`` holds weights saved by :func:`_save_with` under these settings."""
    try:
        with open(f"{path}.json") as handle:
            return os.path.exists(path) and handle.read() == config.to_json()
    except OSError:
        return False


def _member_histories(out: str, members: int) -> list[list[dict[str, str]]]:
    """history.csv rows of the one model, or of each ensemble member."""
    if members == 1:
        return [_history(out)]
    return [_history(os.path.join(out, "members", str(k))) for k in range(members)]


def _operating_point(validation: dict[str, list], rule: str) -> dict[str, Any] | None:
    """The threshold chosen on the validation predictions, or None when they hold one class."""
    from beam_pipelines.contracts import operating_point

    try:
        return operating_point.choose(validation["label"], validation["score"], rule)
    except ValueError as exc:
        logger.warning("No operating point (%s): predictions carry no 'predicted' value", exc)
        return None


def _auc(labels: list[int], scores: list[float]) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(set(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def _describe(card: dict[str, Any]) -> str:
    best = card["best_val_auc"]
    shown = "n/a" if best is None else f"{best:.3f}"
    return f"xray-train: {card['model_id']} best val AUC {shown}, AUC {card['auc']}"


def main() -> None:
    """Console entry point: ``xray-train`` (``--verbose N`` also shows tracebacks)."""
    cli_main("xray-train", run, _describe)


if __name__ == "__main__":
    main()
