"""A trained run's results: the exported model, its predictions, operating point and card.

Writes into the run's work folder ``model/`` (SavedModel, ``model.keras``,
``operating_point.json``), ``predictions/{validation,test}.parquet`` in the
predictions contract, and ``model_card.json``. Keras and TensorFlow are
imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
from typing import Any

import numpy as np

from trainer import resume
from trainer.config import TrainConfig
from trainer.training_data import naming_damaged_shards

logger = logging.getLogger(__name__)

SPLITS_TO_PREDICT = ("validation", "test")


def average(members: list[Any], config: TrainConfig) -> Any:
    """One model whose output is the mean of the members' probabilities."""
    import keras

    from beam_pipelines.contracts import records

    inputs = keras.Input(shape=records.IMAGE_SHAPE, name="image")
    outputs = keras.layers.Average(name="abnormal", dtype="float32")(
        [member(inputs) for member in members]
    )
    return keras.Model(inputs, outputs, name=f"{config.model}_ensemble{len(members)}")


def save_model(model: Any, out: str) -> str:
    """Writes ``out/model/`` (replacing it): a SavedModel and ``model.keras``; returns its path."""
    model_dir = os.path.join(out, "model")
    shutil.rmtree(model_dir, ignore_errors=True)
    model.export(model_dir, verbose=False)  # SavedModel with a serving signature
    model.save(os.path.join(model_dir, "model.keras"))
    return model_dir


def model_id(config: TrainConfig, manifest_bytes: bytes) -> str:
    """The model's name and a digest of its data manifest and settings."""
    digest = hashlib.sha256(manifest_bytes + config.to_json().encode()).hexdigest()
    return f"{config.model}-{digest[:12]}"


def predict_split(model: Any, config: TrainConfig, split: str, model_id: str) -> dict[str, list]:
    """Scores one split in record order; returns columns of the predictions contract."""
    from beam_pipelines.contracts import predictions, records
    from trainer import data

    columns: dict[str, list] = {key: [] for key in predictions.IMAGE_COLUMNS}
    # The record's string features among them are decoded; age and label are integers.
    texts = [key for key in predictions.IMAGE_COLUMNS if key in records.STRING_FEATURES]
    scores: list[float] = []
    for batch in data.evaluation_dataset(config, data.shard_files(config.data_dir, split), True):
        # A direct call, outside the strategy: any batch size, no replica split.
        scores.extend(np.asarray(model(batch["image"], training=False)).reshape(-1).tolist())
        for key in texts:
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


def predict_splits(model: Any, config: TrainConfig, model_id: str) -> dict[str, dict[str, list]]:
    """The predictions of each split of :data:`SPLITS_TO_PREDICT` that has shards."""
    from trainer import data

    predicted: dict[str, dict[str, list]] = {}
    for split in SPLITS_TO_PREDICT:
        try:
            split_files = data.shard_files(config.data_dir, split)
        except FileNotFoundError:
            logger.warning("No %s shards: no %s predictions", split, split)
            continue
        with naming_damaged_shards(split_files):
            predicted[split] = predict_split(model, config, split, model_id)
    return predicted


def choose_operating_point(validation: dict[str, list], rule: str) -> dict[str, Any] | None:
    """The threshold chosen on the validation predictions, or None when they hold one class."""
    from beam_pipelines.contracts import operating_point

    try:
        return operating_point.choose(validation["label"], validation["score"], rule)
    except ValueError as exc:
        logger.warning("No operating point (%s): predictions carry no 'predicted' value", exc)
        return None


def write_predictions(
    out: str, model_dir: str, predicted: dict[str, dict[str, list]], point: dict[str, Any] | None
) -> None:
    """The operating point beside the model, and each split's predictions at it."""
    from beam_pipelines.contracts import operating_point, predictions

    os.makedirs(os.path.join(out, "predictions"), exist_ok=True)
    if point is not None:
        operating_point.write(model_dir, point)
    for split, columns in predicted.items():
        columns["predicted"] = operating_point.predicted(columns["score"], point)
        predictions.write(os.path.join(out, "predictions", f"{split}.parquet"), columns, point)


def _auc(labels: list[int], scores: list[float]) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(set(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def model_card(
    config: TrainConfig,
    out: str,
    manifest: dict[str, Any],
    manifest_bytes: bytes,
    model_id: str,
    predicted: dict[str, dict[str, list]],
    point: dict[str, Any] | None,
    replicas: int,
) -> dict[str, Any]:
    """The model card: data manifest digest, epochs, AUCs, operating point, versions."""
    import keras
    import tensorflow as tf

    metrics = {split: _auc(c["label"], c["score"]) for split, c in predicted.items()}
    epochs = resume.member_histories(out, config.ensemble)
    return {
        "model_id": model_id,
        "model": config.model,
        "data": {
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "schema_version": manifest.get("schema_version"),
            "counts": manifest.get("counts"),
        },
        # From history.csv: it spans a killed run and its resumption.
        "epochs_run": sum(len(h) for h in epochs),
        "best_val_auc": (
            resume.best_val_auc(epochs[0]) if len(epochs) == 1 else metrics.get("validation")
        ),
        "ensemble": (
            None
            if config.ensemble == 1
            else {
                "members": config.ensemble,
                "member_best_val_auc": [resume.best_val_auc(h) for h in epochs],
            }
        ),
        "auc": metrics,
        "operating_point": point,
        "replicas": replicas,
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    }


def write_model_card(out: str, card: dict[str, Any]) -> None:
    """``model_card.json``: sorted keys, two-space indent, a final newline."""
    with open(os.path.join(out, "model_card.json"), "w") as handle:
        json.dump(card, handle, indent=2, sort_keys=True)
        handle.write("\n")
