"""tf.data input pipeline: shards -> parsed records -> (augmented) batches.

Decoder then parser, as in the TF Model Garden: ``schema.tf_parse_example``
turns protos into tensors; training adds shuffling and augmentation; then
batch and prefetch. Files are listed, shuffled and read in parallel with
``interleave``; nothing is ever loaded whole into memory (``cache`` is
opt-in).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from beam_pipelines import schema
from trainer.config import TrainConfig

AUTOTUNE = tf.data.AUTOTUNE


def shard_files(data_dir: str, split: str) -> list[str]:
    """The split's shard files, sorted.

    Raises:
        FileNotFoundError: when the split has no shards.
    """
    if "://" in data_dir and not data_dir.startswith(("gs://", "file://")):
        import tensorflow_io  # noqa: F401  (registers s3://, hdfs://, …)
    files = sorted(tf.io.gfile.glob(f"{data_dir.rstrip('/')}/{split}/*.tfrecord.gz"))
    if not files:
        raise FileNotFoundError(f"no {split} shards under {data_dir}/{split}/")
    return files


def records(files: list[str], training: bool, seed: int) -> tf.data.Dataset:
    """Parsed records (dicts of tensors) from the shard files."""
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if training:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
        cycle_length=min(len(files), 8),
        num_parallel_calls=AUTOTUNE,
        # Evaluation keeps file order so predictions line up with records.
        deterministic=not training,
    )
    return dataset.map(schema.tf_parse_example, num_parallel_calls=AUTOTUNE)


def augmenter(config: TrainConfig) -> Any:
    """The train-time augmentation as Keras preprocessing layers (run inside tf.data)."""
    import keras

    layers: list[Any] = []
    if config.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=config.seed))
    if config.rotation_degrees:
        layers.append(
            keras.layers.RandomRotation(
                config.rotation_degrees / 360.0, fill_mode="constant", seed=config.seed
            )
        )
    if config.shift_fraction:
        layers.append(
            keras.layers.RandomTranslation(
                config.shift_fraction,
                config.shift_fraction,
                fill_mode="constant",
                seed=config.seed,
            )
        )
    if config.zoom_fraction:
        layers.append(
            keras.layers.RandomZoom(config.zoom_fraction, fill_mode="constant", seed=config.seed)
        )
    if config.brightness:
        layers.append(
            keras.layers.RandomBrightness(
                config.brightness, value_range=(0.0, 1.0), seed=config.seed
            )
        )
    if config.contrast:
        layers.append(keras.layers.RandomContrast(config.contrast, seed=config.seed))
    return keras.Sequential(layers, name="augment") if layers else None


def training_dataset(config: TrainConfig, files: list[str]) -> tf.data.Dataset:
    """Endless shuffled, augmented (image, label) batches of the global batch size."""
    dataset = records(files, training=True, seed=config.seed).map(
        lambda r: (r["image"], r["label"]), num_parallel_calls=AUTOTUNE
    )
    if config.cache:
        dataset = dataset.cache()
    dataset = dataset.shuffle(config.shuffle_buffer, seed=config.seed).repeat()
    dataset = dataset.batch(config.global_batch_size, drop_remainder=True)
    augment = augmenter(config) if config.augment else None
    if augment is not None:
        dataset = dataset.map(
            lambda x, y: (tf.clip_by_value(augment(x, training=True), 0.0, 1.0), y),
            num_parallel_calls=AUTOTUNE,
        )
    return dataset.prefetch(AUTOTUNE)


def evaluation_dataset(
    config: TrainConfig, files: list[str], with_metadata: bool = False, count: int | None = None
) -> tf.data.Dataset:
    """One ordered pass over the split.

    Args:
        config: the run's configuration (batch size, cache).
        files: the split's shard files.
        with_metadata: yield whole record dicts (for predictions) instead of
            ``(image, label, weight)``.
        count: the split's record count; when given, the last batch is filled
            up with zero-weight blank images so every batch is full. Mirrored
            replicas then always get equal shares (Keras fails on a ragged
            last batch) and the padding counts for nothing in loss or metrics.
    """
    dataset = records(files, training=False, seed=config.seed)
    if with_metadata:
        return dataset.batch(config.global_batch_size).prefetch(AUTOTUNE)
    dataset = dataset.map(
        lambda r: (r["image"], r["label"], tf.constant(1.0)), num_parallel_calls=AUTOTUNE
    )
    if config.cache:
        dataset = dataset.cache()
    padding = (-count) % config.global_batch_size if count else 0
    if padding:
        blank = (tf.zeros(schema.IMAGE_SHAPE), tf.constant(0, tf.int64), tf.constant(0.0))
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
    return dataset.batch(config.global_batch_size).prefetch(AUTOTUNE)
