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

This module wires the steps together: the data checks
(:mod:`trainer.training_data`), the fit (:mod:`trainer.fit`, with
:mod:`trainer.callbacks` and :mod:`trainer.resume`) and the results
(:mod:`trainer.export`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from beam_pipelines.cli import main as cli_main
from beam_pipelines.cli import refuse
from beam_pipelines.storage.committer import open_output
from trainer import export, fit
from trainer.config import TrainConfig, load_config
from trainer.training_data import check_training_data, read_manifest

if TYPE_CHECKING:
    from trainer.strategy import Task

logger = logging.getLogger(__name__)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs training; returns the model card.

    Preflight (exit 2, one line): ``TF_CONFIG``, the manifest, the train and
    validation shards, the output location and its lock. The run writes
    into the output's work folder (where a killed run's backup is resumed
    from) and replaces the previous results only once the model card is
    written. In a cluster (``TF_CONFIG``), see :func:`_run_in_cluster`.
    """
    from trainer.strategy import cluster_task

    config = load_config(argv)
    try:
        task = cluster_task()
    except ValueError as exc:
        refuse("xray-train", f"TF_CONFIG: {exc}")
    if task is not None and config.logical_cpus > 1:
        refuse("xray-train", "--logical_cpus is for one host: with TF_CONFIG, one replica a worker")
    try:
        manifest, manifest_bytes = read_manifest(config.data_dir)
        shards = check_training_data(config.data_dir, manifest)
    except ValueError as exc:
        refuse("xray-train", f"--data_dir {config.data_dir}: {exc}")
    if task is not None:
        return _run_in_cluster(config, task, manifest, manifest_bytes, shards)
    problem = fit.starting_point_problem(config)
    if problem:
        refuse("xray-train", problem)
    from trainer.strategy import make_strategy

    # Logical devices must be configured before anything else touches TF
    # (after the output is locked, as before: the lock costs no TF op).
    return _train_and_commit(
        config, manifest, manifest_bytes, shards, lambda: make_strategy(config.logical_cpus)
    )


def _train_and_commit(
    config: TrainConfig,
    manifest: dict[str, Any],
    manifest_bytes: bytes,
    shards: dict[str, list[str]],
    strategy_maker: Callable[[], Any],
) -> dict[str, Any]:
    """Trains in the output's work folder under the strategy ``strategy_maker`` makes; commits."""
    output = open_output(
        "--output_dir",
        config.output_dir,
        "xray-train",
        resume=True,
        inputs=(config.data_dir,),
    )
    with output:
        strategy = strategy_maker()
        card = _train(config, output.work, manifest, manifest_bytes, shards, strategy)
        output.commit(last="model_card.json")
    logger.info("Model %s written to %s; AUC %s", card["model_id"], config.output_dir, card["auc"])
    return card


def _run_in_cluster(
    config: TrainConfig,
    task: Task,
    manifest: dict[str, Any],
    manifest_bytes: bytes,
    shards: dict[str, list[str]],
) -> dict[str, Any]:
    """One worker of a MultiWorkerMirroredStrategy cluster.

    Every worker trains and saves (the collectives need them all); the
    chief does so in the output's work folder, holds the lock, predicts and
    commits; the others work in :func:`~trainer.strategy.worker_folder`,
    wait for the chief's commit, then delete it.
    """
    from trainer.strategy import gather, make_strategy, worker_folder

    # Before any other TF op (the starting-point check may build a model).
    strategy = make_strategy(task=task)
    problem = fit.starting_point_problem(config)
    if problem:
        refuse("xray-train", problem)
    folder = worker_folder(config.output_dir, task)
    if not task.is_chief:
        os.makedirs(folder, exist_ok=True)
        card = _train(config, folder, manifest, manifest_bytes, shards, strategy, chief=False)
        gather(strategy, [0])  # the chief has committed
        shutil.rmtree(folder, ignore_errors=True)
        gather(strategy, [0])  # lets the chief remove the workers' folder
        return {**card, "task": task.name}
    card = _train_and_commit(config, manifest, manifest_bytes, shards, lambda: strategy)
    gather(strategy, [1])  # the workers delete their folders now
    gather(strategy, [1])
    with contextlib.suppress(OSError):  # absent here when the workers run on other hosts
        os.rmdir(os.path.dirname(folder))
    return card


def _train(
    config: TrainConfig,
    out: str,
    manifest: dict[str, Any],
    manifest_bytes: bytes,
    shards: dict[str, list[str]],
    strategy: Any,
    chief: bool = True,
) -> dict[str, Any]:
    """Trains into ``out``; returns the model card (a worker's: its model id alone)."""
    fit.set_up_keras(config)
    with open(os.path.join(out, "config.json"), "w") as handle:
        handle.write(config.to_json())

    members = fit.fit_members(config, out, strategy, manifest, shards)
    model = members[0] if len(members) == 1 else export.average(members, config)
    model_dir = export.save_model(model, out)

    model_id = export.model_id(config, manifest_bytes)
    if not chief:
        return {"model_id": model_id}
    # Direct calls, outside the strategy: no collective, the workers need not take part.
    predicted = export.predict_splits(model, config, model_id)
    point = export.choose_operating_point(predicted["validation"], config.operating_point)
    export.write_predictions(out, model_dir, predicted, point)
    card = export.model_card(
        config,
        out,
        manifest,
        manifest_bytes,
        model_id,
        predicted,
        point,
        strategy.num_replicas_in_sync,
    )
    export.write_model_card(out, card)
    return card


def _describe(card: dict[str, Any]) -> str:
    if "task" in card:
        return f"xray-train: {card['model_id']} {card['task']} done; the chief wrote the results"
    best = card["best_val_auc"]
    shown = "n/a" if best is None else f"{best:.3f}"
    return f"xray-train: {card['model_id']} best val AUC {shown}, AUC {card['auc']}"


def main() -> None:
    """Console entry point: ``xray-train`` (``--verbose N`` also shows tracebacks)."""
    cli_main("xray-train", run, _describe)


if __name__ == "__main__":
    main()
