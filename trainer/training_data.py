"""The preprocessed data a run trains on: its manifest, its shards, checked before any work.

Also names a damaged shard when TensorFlow's read error does not, and the
class weights the manifest's counts give. TensorFlow is imported inside the
functions, so the preflight checks cost nothing until they run.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any


class TrainingDataError(RuntimeError):
    """The preprocessed data cannot be trained on (a damaged shard, …); the message says why."""


def read_manifest(data_dir: str) -> tuple[dict[str, Any], bytes]:
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


@contextlib.contextmanager
def naming_damaged_shards(files: list[str]) -> Iterator[None]:
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


def class_weights(manifest: dict[str, Any]) -> dict[int, float] | None:
    """Inverse-frequency class weights from the training counts (mean weight 1)."""
    counts = manifest["counts"]["train"]
    normal, abnormal = counts["normal"], counts["abnormal"]
    if not normal or not abnormal:
        return None
    total = normal + abnormal
    return {0: total / (2.0 * normal), 1: total / (2.0 * abnormal)}
