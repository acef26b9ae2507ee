"""Acquisition shifts of [0, 1] image batches: gamma, contrast, noise, blur, resolution, zoom.

What changes between sites, scanners and years of one hospital: the
detector's response curve (gamma), exposure and processing (contrast),
quantum noise, sharpness (blur), resolution, and how the chest is framed
(zoom). The same functions serve train-time augmentation
(:func:`trainer.data.augment_batch`, random strengths) and the robustness
check of ``benchmarks/recipe_ablation.py`` (fixed strengths), so the shifts a
model is tested under are the ones it may have been trained against.
All take and return float32 batches shaped [n, H, W, 1], values in [0, 1].
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf


def gamma(images: tf.Tensor, exponent: Any) -> tf.Tensor:
    """``x ** exponent`` (per image when ``exponent`` is shaped [n, 1, 1, 1])."""
    return tf.pow(tf.clip_by_value(images, 1e-6, 1.0), exponent)


def contrast(images: tf.Tensor, factor: Any) -> tf.Tensor:
    """Scales each image's deviation from its mean by ``factor``; clipped to [0, 1]."""
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    return tf.clip_by_value((images - mean) * factor + mean, 0.0, 1.0)


def noise(images: tf.Tensor, std: Any, seed: tf.Tensor) -> tf.Tensor:
    """Adds Gaussian noise of standard deviation ``std`` (stateless); clipped."""
    drawn = tf.random.stateless_normal(tf.shape(images), seed=seed)
    return tf.clip_by_value(images + drawn * std, 0.0, 1.0)


def blur(images: tf.Tensor, sigma: float | tf.Tensor) -> tf.Tensor:
    """Gaussian blur of standard deviation ``sigma`` pixels (one sigma for the batch)."""
    sigma = tf.maximum(tf.cast(sigma, tf.float32), 1e-3)
    radius = 4  # covers sigma up to ~1.5 px; stronger blur is a resolution shift
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / sigma))
    kernel = kernel / tf.reduce_sum(kernel)
    padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], "SYMMETRIC")
    rows = tf.nn.conv2d(padded, tf.reshape(kernel, [-1, 1, 1, 1]), 1, "VALID")
    return tf.nn.conv2d(rows, tf.reshape(kernel, [1, -1, 1, 1]), 1, "VALID")


def resolution(images: tf.Tensor, scale: float | tf.Tensor) -> tf.Tensor:
    """Down-samples by ``scale`` (< 1) with area averaging and back up bilinearly."""
    size = tf.shape(images)[1:3]
    small = tf.maximum(tf.cast(tf.round(tf.cast(size, tf.float32) * scale), tf.int32), 8)
    reduced = tf.image.resize(images, small, method="area")
    return tf.clip_by_value(tf.image.resize(reduced, size, method="bilinear"), 0.0, 1.0)


def zoom(images: tf.Tensor, factor: float) -> tf.Tensor:
    """Zooms in (``factor`` > 1: a central crop resized back) or out (< 1: black border)."""
    size = images.shape[1]
    if factor >= 1.0:
        return tf.image.resize(tf.image.central_crop(images, 1.0 / factor), [size, size])
    inner = max(8, int(round(size * factor)))
    small = tf.image.resize(images, [inner, inner], method="area")
    return tf.image.resize_with_crop_or_pad(small, size, size)


#: The controlled shifts of the robustness check: name -> (strength label, function).
ROBUSTNESS_SHIFTS: dict[str, tuple[str, Any]] = {
    "gamma 0.6": ("brighter response", lambda x: gamma(x, 0.6)),
    "gamma 1.6": ("darker response", lambda x: gamma(x, 1.6)),
    "contrast 0.6": ("flatter", lambda x: contrast(x, 0.6)),
    "contrast 1.4": ("harder", lambda x: contrast(x, 1.4)),
    "noise 0.04": ("quantum noise", lambda x: noise(x, 0.04, tf.constant([7, 11], tf.int64))),
    "blur 1.2 px": ("softer detector", lambda x: blur(x, 1.2)),
    "resolution 0.5": ("half resolution", lambda x: resolution(x, 0.5)),
    "zoom 1.15": ("tighter framing", lambda x: zoom(x, 1.15)),
    "zoom 0.87": ("wider framing", lambda x: zoom(x, 0.87)),
}


def log_uniform_exponent(drawn: tf.Tensor, strength: float) -> tf.Tensor:
    """A gamma exponent exp(u * strength) for ``drawn`` uniform in [-1, 1]."""
    return tf.exp(drawn * math.log1p(strength)) if strength else tf.ones_like(drawn)
