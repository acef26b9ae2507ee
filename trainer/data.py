"""tf.data input pipeline: shards -> batches of parsed, (augmented) images.

Decoder then parser, as in the TF Model Garden. Files are listed, shuffled
and read in parallel with ``interleave``; the still-serialized records are
shuffled (half the bytes of decoded images), batched, and parsed one batch at
a time with ``tf_parse_examples`` (one vectorized op per feature);
training then augments; everything is prefetched. Nothing is ever loaded
whole into memory (``cache`` is opt-in and keeps the compact serialized form).
"""

from __future__ import annotations

import json
import math
from typing import Any

import tensorflow as tf

from beam_pipelines.contracts import records
from trainer import shifts
from trainer.config import TrainConfig

AUTOTUNE = tf.data.AUTOTUNE


def found_shards(data_dir: str, split: str) -> list[str]:
    """The shard files on disk under ``data_dir/split/``, sorted (the folder name is literal)."""
    import glob

    if "://" in data_dir and not data_dir.startswith(("gs://", "file://")):
        import tensorflow_io  # noqa: F401  (registers s3://, hdfs://, …)
    pattern = f"{glob.escape(data_dir.rstrip('/'))}/{split}/*.tfrecord.gz"
    return sorted(tf.io.gfile.glob(pattern))


def shard_files(data_dir: str, split: str) -> list[str]:
    """The split's shard files, sorted: the ones its manifest lists, else those found.

    Raises:
        FileNotFoundError: when the split has no shards.
    """
    root = data_dir.rstrip("/")
    manifest = f"{root}/manifest.json"
    listed: list[str] = []
    if tf.io.gfile.exists(manifest):
        with tf.io.gfile.GFile(manifest, "rb") as handle:
            shards = json.loads(handle.read()).get("files", {}).get("shards", [])
        listed = sorted(f"{root}/{name}" for name in shards if name.startswith(f"{split}/"))
    files = listed or found_shards(data_dir, split)
    if not files:
        raise FileNotFoundError(f"no {split} shards under {data_dir}/{split}/")
    return files


def serialized_records(files: list[str], training: bool, seed: int) -> tf.data.Dataset:
    """The serialized records of the shard files (read in parallel)."""
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if training:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    return dataset.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP", buffer_size=8 << 20),
        cycle_length=min(len(files), 8),
        num_parallel_calls=AUTOTUNE,
        # Evaluation keeps file order so predictions line up with records.
        deterministic=not training,
    )


def _uniform(seeds: tf.Tensor, which: int, shape: Any, low: float, high: float) -> tf.Tensor:
    """Stateless uniform draw number ``which`` of a batch's seeds."""
    return tf.random.stateless_uniform(shape, seed=seeds[which], minval=low, maxval=high)


def random_affine(images: tf.Tensor, config: TrainConfig, seeds: tf.Tensor) -> tf.Tensor:
    """Random rotation, shift and zoom of a batch as one bilinear resample.

    One composed transform instead of three Keras layers: each resamples the
    whole image, and together they cost more than the CPU training step.
    Areas brought in from outside the image are black (air). ``seeds``: the
    batch's stateless seeds (see :func:`augment_batch`).
    """
    n = tf.shape(images)[0]
    size = float(records.IMAGE_SIZE)
    centre = (size - 1.0) / 2.0
    angle = _uniform(seeds, 0, [n], -1.0, 1.0) * (config.rotation_degrees * math.pi / 180.0)
    scale = 1.0 + _uniform(seeds, 1, [n], -config.zoom_fraction, config.zoom_fraction)
    dx = _uniform(seeds, 2, [n], -1.0, 1.0) * config.shift_fraction * size
    dy = _uniform(seeds, 3, [n], -1.0, 1.0) * config.shift_fraction * size
    # Maps output to input coordinates about the centre, as the op expects.
    a0, a1 = tf.cos(angle) * scale, -tf.sin(angle) * scale
    b0, b1 = tf.sin(angle) * scale, tf.cos(angle) * scale
    a2 = centre - a0 * centre - a1 * centre - dx
    b2 = centre - b0 * centre - b1 * centre - dy
    zeros = tf.zeros([n])
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=[records.IMAGE_SIZE, records.IMAGE_SIZE],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def augment_batch(images: tf.Tensor, config: TrainConfig, seed: tf.Tensor) -> tf.Tensor:
    """Train-time augmentation of a batch of [0,1] images; stays in [0,1].

    Geometry (flip, rotation, shift, zoom), then the acquisition shifts of
    :mod:`trainer.shifts` at random strengths (gamma, blur, resolution,
    noise: what differs between sites and years), then brightness and
    contrast. Stateless: ``seed`` (shape [2], int) fixes every random draw, so
    batch k of a run is augmented the same way whether the run got there in
    one go or resumed after a kill (see :func:`training_dataset`).
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=12)
    if config.flip:
        images = tf.image.stateless_random_flip_left_right(images, seed=seeds[4])
    if config.rotation_degrees or config.shift_fraction or config.zoom_fraction:
        images = random_affine(images, config, seeds)
    n = tf.shape(images)[0]
    if config.gamma:
        drawn = _uniform(seeds, 7, [n, 1, 1, 1], -1.0, 1.0)
        images = shifts.gamma(images, shifts.log_uniform_exponent(drawn, config.gamma))
    if config.blur_sigma:
        # One strength per batch (a convolution per image would cost more
        # than the CPU training step); half of the batches stay sharp.
        sigma = _uniform(seeds, 8, [], -config.blur_sigma, config.blur_sigma)
        images = tf.cond(sigma > 0, lambda: shifts.blur(images, sigma), lambda: images)
    if config.resolution_jitter:
        scale = _uniform(seeds, 9, [], -config.resolution_jitter, config.resolution_jitter)
        images = tf.cond(scale < 0, lambda: shifts.resolution(images, 1.0 + scale), lambda: images)
    if config.noise_std:
        std = _uniform(seeds, 10, [n, 1, 1, 1], 0.0, config.noise_std)
        images = shifts.noise(images, std, seeds[11])
    if config.brightness:
        delta = _uniform(seeds, 5, [n, 1, 1, 1], -config.brightness, config.brightness)
        images = images + delta
    if config.contrast:
        factor = 1.0 + _uniform(seeds, 6, [n, 1, 1, 1], -config.contrast, config.contrast)
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        images = (images - mean) * factor + mean
    return tf.clip_by_value(images, 0.0, 1.0)


def auto_shard_policy(files: int, workers: int) -> tf.data.experimental.AutoShardPolicy:
    """How several workers split the training data: by file when each gets one, else by record.

    FILE: each worker reads only its shards (files >= workers). DATA: each
    reads every record and keeps its part of each global batch (fewer files
    than workers; the same batches as one worker, at N times the reading).
    """
    policy = tf.data.experimental.AutoShardPolicy
    return policy.FILE if files >= workers else policy.DATA


def _sharded(
    dataset: tf.data.Dataset, policy: tf.data.experimental.AutoShardPolicy
) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    return dataset.with_options(options)


def training_dataset(
    config: TrainConfig, files: list[str], skip_batches: int = 0, workers: int = 1
) -> tf.data.Dataset:
    """Endless shuffled, augmented (image, label) batches of the global batch size.

    The stream depends only on the seed: batch k holds the same records,
    augmented the same way, in every run. ``skip_batches`` starts it at a
    later batch (a resumed run skips the batches of the epochs it already
    trained on); skipped batches are read but neither parsed nor augmented.
    """
    dataset = serialized_records(files, training=True, seed=config.seed)
    if config.cache:
        dataset = dataset.cache()
    dataset = dataset.shuffle(config.shuffle_buffer, seed=config.seed).repeat()
    dataset = dataset.batch(config.global_batch_size, drop_remainder=True)
    dataset = dataset.enumerate().skip(skip_batches)

    def to_pair(index: tf.Tensor, serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch = tf_parse_examples(serialized)
        images = batch["image"]
        if config.augment:
            images = augment_batch(
                images, config, tf.stack([tf.constant(config.seed, tf.int64), index])
            )
        return images, batch["label"]

    dataset = dataset.map(to_pair, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
    return _sharded(dataset, auto_shard_policy(len(files), workers)) if workers > 1 else dataset


def evaluation_dataset(
    config: TrainConfig,
    files: list[str],
    with_metadata: bool = False,
    pad: bool = False,
    workers: int = 1,
) -> tf.data.Dataset:
    """One ordered pass over the split.

    Args:
        config: the run's configuration (batch size, cache).
        files: the split's shard files.
        with_metadata: yield whole parsed record batches (for predictions)
            instead of ``(image, label, weight)``.
        pad: fill the last batch up with zero-weight blank images so every
            batch is full. Needed with several replicas: Keras fails when a
            ragged last batch splits unevenly. The padding counts for nothing
            in the weighted metrics (AUC, accuracy, …) nor in that batch's
            ``mean_with_sample_weight`` loss, but Keras still weighs the
            batch's loss by its padded size in the epoch mean, so the
            reported ``val_loss`` shifts slightly (``val_auc``, which drives
            early stopping, does not).
        workers: with several, each takes its part of every (full, padded)
            batch (DATA sharding): every worker runs the same number of
            steps and every record counts once.
    """
    batch_size = config.global_batch_size
    dataset = serialized_records(files, training=False, seed=config.seed)
    if config.cache and not with_metadata:
        dataset = dataset.cache()
    dataset = dataset.batch(batch_size).map(tf_parse_examples, num_parallel_calls=AUTOTUNE)
    if with_metadata:
        return dataset.prefetch(AUTOTUNE)
    if not pad:
        return dataset.map(
            lambda b: (b["image"], b["label"], tf.ones_like(b["label"], tf.float32)),
            num_parallel_calls=AUTOTUNE,
        ).prefetch(AUTOTUNE)

    def padded(batch: dict[str, Any]) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        missing = batch_size - tf.shape(batch["label"])[0]
        images = tf.pad(batch["image"], [[0, missing], [0, 0], [0, 0], [0, 0]])
        labels = tf.pad(batch["label"], [[0, missing]])
        weights = tf.pad(tf.ones_like(batch["label"], tf.float32), [[0, missing]])
        return (
            tf.ensure_shape(images, (batch_size, *records.IMAGE_SHAPE)),
            tf.ensure_shape(labels, (batch_size,)),
            tf.ensure_shape(weights, (batch_size,)),
        )

    dataset = dataset.map(padded, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
    return _sharded(dataset, tf.data.experimental.AutoShardPolicy.DATA) if workers > 1 else dataset


def tf_feature_spec() -> dict[str, Any]:
    """The ``tf.io.parse_example`` feature spec of a record."""
    spec: dict[str, Any] = {records.IMAGE: tf.io.FixedLenFeature([], tf.string)}
    spec.update({key: tf.io.FixedLenFeature([], tf.string) for key in records.STRING_FEATURES})
    spec.update({key: tf.io.FixedLenFeature([], tf.int64) for key in records.INT_FEATURES})
    return spec


def tf_parse_examples(serialized: Any) -> dict[str, Any]:
    """Parses a batch (1-D string tensor) at once: one vectorized op per feature.

    Returns:
        As :func:`tf_parse_example`, with a leading batch dimension
        (``image``: float32 ``(batch, 224, 224, 1)``).
    """
    parsed = tf.io.parse_example(serialized, tf_feature_spec())
    pixels = tf.io.decode_raw(parsed.pop(records.IMAGE), tf.uint16, little_endian=True)
    image = tf.reshape(
        tf.cast(pixels, tf.float32) / float(records.IMAGE_MAX), (-1, *records.IMAGE_SHAPE)
    )
    return {"image": image, **parsed}


def tf_parse_example(serialized: Any) -> dict[str, Any]:
    """Parses a scalar string tensor inside a TF graph (the trainer's decoder).

    Returns:
        A dict of tensors: ``image`` float32 ``(224, 224, 1)`` in [0, 1],
        ``label`` int64, and the other features as in the spec (``age`` is
        ``-1`` when unknown).
    """
    parsed = tf.io.parse_single_example(serialized, tf_feature_spec())
    pixels = tf.io.decode_raw(parsed.pop(records.IMAGE), tf.uint16, little_endian=True)
    image = tf.reshape(tf.cast(pixels, tf.float32) / float(records.IMAGE_MAX), records.IMAGE_SHAPE)
    return {"image": image, **parsed}
