"""Training the model(s): the starting point, compilation, and the resumable fit loop.

One model, or each member of an ensemble, trains in two phases at most (a
frozen start, then everything), each one ``model.fit`` that a killed run
resumes from its backup (:mod:`trainer.resume`). Keras and TensorFlow are
imported inside the functions, after :mod:`trainer.strategy` set the devices up.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

from trainer import resume
from trainer.callbacks import training_callbacks
from trainer.config import TrainConfig
from trainer.training_data import class_weights, naming_damaged_shards

logger = logging.getLogger(__name__)


def set_up_keras(config: TrainConfig) -> None:
    """Seeds Keras, and sets op determinism and mixed precision as configured."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")


def fit_members(
    config: TrainConfig,
    out: str,
    strategy: Any,
    manifest: dict[str, Any],
    shards: dict[str, list[str]],
) -> list[Any]:
    """Trains the model, or each ensemble member in ``out/members/k``; returns them."""
    from trainer import data
    from trainer import strategy as strategy_lib

    workers = strategy_lib.worker_count(strategy)
    if workers > 1:
        logger.info(
            "%d workers share %d training shard file(s): auto-shard by %s",
            workers,
            len(shards["train"]),
            data.auto_shard_policy(len(shards["train"]), workers).name,
        )
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
            fit_member(
                member,
                dataclasses.replace(member, output_dir=member_out),
                strategy,
                manifest,
                shards,
                name=config.model if config.ensemble == 1 else f"{config.model}_member{k}",
            )
        )
    return members


def fit_member(
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
    from trainer import strategy as strategy_lib

    keras.utils.set_random_seed(config.seed)
    out = work_config.output_dir
    finished = os.path.join(out, "member.weights.h5")
    done = resume.saved_with(finished, config)
    resume_epoch = None if done else resume.usable_backup(os.path.join(out, "backup"))
    # Keras deletes the backup when a fit ends: the frozen phase leaves its own
    # end state, so a kill early in the second phase does not start over.
    frozen_end = os.path.join(out, "frozen_phase.weights.h5")
    frozen_done = bool(config.freeze_epochs) and resume.saved_with(frozen_end, config)
    workers = strategy_lib.worker_count(strategy)
    if workers > 1:  # every worker must run the same epochs
        done, resume_epoch, frozen_done = resume.agreed_start(
            lambda values: strategy_lib.gather(strategy, values),
            os.path.join(out, "backup"),
            done,
            resume_epoch,
            frozen_done,
        )
    start = resume_epoch or (config.freeze_epochs if frozen_done and not done else 0)
    if resume_epoch is not None:
        logger.info("Resuming %s at epoch %d from its backup", name, resume_epoch)
    if not done:
        resume.trim_history(out, start)  # a fresh run starts a fresh history
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
        model = initial_model(config, name, stats)
        compile_model(model, config, steps_per_epoch, frozen=config.freeze_epochs > 0)
    if done:  # trained to the end before an interruption, with these settings
        model.load_weights(finished)
        return model
    if resume_epoch is not None and not resume.restore_rng_states(
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
                compile_model(model, config, steps_per_epoch, frozen=False)
            # The learning-rate schedule goes on from the frozen phase's last
            # step instead of warming up again (a resumed run's backup restores it).
            model.optimizer.iterations.assign(config.freeze_epochs * steps_per_epoch)
        # The batches the finished epochs trained on are skipped, so a
        # resumed run sees the very batches an uninterrupted one would.
        train_data = data.training_dataset(config, train_files, start * steps_per_epoch, workers)
        build_from_spec(model, strategy, train_data.element_spec)
        if workers > 1:
            adapt_to_cluster(model)
        with naming_damaged_shards([*train_files, *validation_files]):
            model.fit(
                train_data,
                validation_data=data.evaluation_dataset(
                    config, validation_files, pad=strategy.num_replicas_in_sync > 1, workers=workers
                ),
                initial_epoch=start,
                epochs=end,
                steps_per_epoch=steps_per_epoch,
                class_weight=weights,
                callbacks=training_callbacks(
                    work_config,
                    steps_per_epoch,
                    resume.read_history(out) if start else [],
                    phase_start=0 if frozen else config.freeze_epochs,
                ),
                verbose=config.verbose,
            )
        if frozen:
            resume.save_with(model, frozen_end, config)
        start = end
    best = os.path.join(out, "checkpoints", "best.weights.h5")
    if os.path.exists(best):
        model.load_weights(best)
    resume.save_with(model, finished, config)  # a run resumed after a kill skips this member
    return model


def build_from_spec(model: Any, strategy: Any, spec: Any) -> None:
    """Builds the model from the training data's spec, not from a batch drawn for it.

    Under a tf.distribute strategy (``--logical_cpus``, GPUs, a cluster)
    Keras 3 (3.15) ``fit`` and ``evaluate`` start with a symbolic build fed
    by a batch they draw from an iterator of their own; the training then
    iterates the dataset afresh, and the seeded shuffle, reshuffled at each
    new iterator, gives another order: ``--logical_cpus 2`` trained on other
    batches than one replica. Under MultiWorkerMirroredStrategy that build
    also fails (it averages the drawn (image, label, …) tuple with
    ``strategy.reduce``: ValueError, PerReplica to a Tensor). Shapes and
    dtypes are all it needs. The default strategy (one replica) is left
    alone: Keras builds there while tracing the first step.
    """
    import tensorflow as tf

    if strategy is tf.distribute.get_strategy():
        return

    def build(iterator: Any = None, data_batch: Any = None) -> None:
        with strategy.scope():
            model._symbolic_build(data_batch=spec)

    model._maybe_symbolic_build = build


def adapt_to_cluster(model: Any) -> None:
    """Lets Keras 3 (3.15) ``fit`` and ``evaluate`` run under MultiWorkerMirroredStrategy.

    With :func:`build_from_spec` for their first step: each step's logs are
    averaged with ``strategy.reduce(..., axis=0)``, invalid for scalars, so
    they get one dimension. Epoch logs (history, early stopping) are read
    from the metrics' variables, summed over all workers.
    """
    import tensorflow as tf

    def with_axis(step: Any) -> Any:
        return lambda data: {k: tf.reshape(v, [1]) for k, v in step(data).items()}

    model.train_step = with_axis(type(model).train_step.__get__(model))
    model.test_step = with_axis(type(model).test_step.__get__(model))


def steps_in_epoch(config: TrainConfig, train_count: int) -> int:
    """Batches per epoch: ``steps_per_epoch``, else one pass of at least ``min_steps_per_epoch``."""
    return config.steps_per_epoch or max(
        1, config.min_steps_per_epoch, math.ceil(train_count / config.global_batch_size)
    )


def starting_point_problem(config: TrainConfig) -> str | None:
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


def initial_model(config: TrainConfig, name: str, stats: dict[str, Any]) -> Any:
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


def compile_model(model: Any, config: TrainConfig, steps_per_epoch: int, frozen: bool) -> None:
    """Compiles for training; ``frozen`` trains the output layer alone."""
    import keras

    set_trainable(model, frozen)
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


def set_trainable(model: Any, frozen: bool) -> None:
    """Everything trainable, or (frozen) only the output layers, also inside ensemble members."""
    import keras

    model.trainable = True
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            set_trainable(layer, frozen)
        else:
            layer.trainable = not frozen or (layer.name == "abnormal" and bool(layer.weights))
