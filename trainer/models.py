"""Model architectures: one input channel, sigmoid output for Abnormal.

All models take the 224x224x1 [0,1] image the schema stores and standardize
it inside the model with the training split's pixel mean/std (from the
manifest), so the exported model's input is exactly what preprocessing and
scoring produce. ``keras.applications`` backbones train from scratch by
default (``weights=None``: nothing is downloaded). With ``weights="imagenet"``
(downloaded once into the Keras cache when online) or a weights file, the
backbone takes three channels: the grey image is replicated into them.
"""

from __future__ import annotations

import os
from typing import Any

import keras

from beam_pipelines.contracts import records

_APPLICATIONS = {
    "densenet121": "DenseNet121",  # CheXNet's architecture
    "resnet50": "ResNet50",
    "efficientnetb0": "EfficientNetB0",
}
MODEL_NAMES = ("simple_cnn", *_APPLICATIONS)
# The files keras.applications fetches for include_top=False ImageNet weights.
_IMAGENET_FILES = {
    "densenet121": "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "efficientnetb0": "efficientnetb0_notop.h5",
}


class WeightsUnavailable(ValueError):
    """Pretrained weights that cannot be had here; the message names the file to place."""


def backbone(name: str, weights: str | None = None) -> keras.Model:
    """The ``keras.applications`` backbone (no top, average pooling).

    Args:
        name: a key of the applications (not ``simple_cnn``).
        weights: None (random), ``"imagenet"`` or a weights file of this backbone.

    Raises:
        WeightsUnavailable: ImageNet weights neither cached nor downloadable.
    """
    channels = 1 if weights is None else 3
    shape = (*records.IMAGE_SHAPE[:2], channels)
    build = getattr(keras.applications, _APPLICATIONS[name])
    if weights != "imagenet":
        model = build(weights=None, include_top=False, input_shape=shape, pooling="avg")
        if weights is not None:
            model.load_weights(weights)
        return model
    try:
        return build(weights="imagenet", include_top=False, input_shape=shape, pooling="avg")
    except Exception as exc:  # keras' download raises whatever the network gives
        cache = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "models")
        raise WeightsUnavailable(
            f"ImageNet weights for {name} could not be downloaded ({type(exc).__name__}); "
            f"offline, place {_IMAGENET_FILES[name]} in {cache}"
        ) from exc


def _simple_cnn(x: Any) -> Any:
    """A small CNN that trains in minutes on a CPU: ~50M multiply-adds per image.

    Batch-norm momentum 0.9 (not 0.99): short CPU runs take few steps, and
    slow moving averages would leave evaluation far from training.
    """
    x = keras.layers.Conv2D(16, 5, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    for filters in (32, 64, 128):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.Activation("relu")(x)
        x = keras.layers.MaxPooling2D(2)(x)
    return keras.layers.GlobalAveragePooling2D()(x)


def build_model(
    name: str,
    pixel_mean: float = 0.5,
    pixel_std: float = 0.25,
    dropout: float = 0.2,
    model_name: str | None = None,
    weights: str | None = None,
) -> keras.Model:
    """Builds an uncompiled model.

    Args:
        name: one of :data:`MODEL_NAMES`.
        model_name: the Keras model's name (default ``name``; ensemble
            members need distinct ones).
        weights: pretrained backbone weights: ``"imagenet"`` or a weights
            file (applications only; see :func:`backbone`).
        pixel_mean: training-pixel mean, for in-model standardization.
        pixel_std: training-pixel standard deviation (> 0).
        dropout: dropout before the output layer.

    Raises:
        ValueError: for an unknown name or a non-positive std.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
    if pixel_std <= 0:
        raise ValueError(f"pixel_std must be > 0, got {pixel_std}")
    if weights is not None and name == "simple_cnn":
        raise ValueError("pretrained weights need a keras.applications backbone, not simple_cnn")
    inputs = keras.Input(shape=records.IMAGE_SHAPE, name="image")
    x = keras.layers.Normalization(mean=pixel_mean, variance=pixel_std**2, name="standardize")(
        inputs
    )
    if name == "simple_cnn":
        x = _simple_cnn(x)
    else:
        if weights is not None:  # pretrained filters expect three channels
            x = keras.layers.Concatenate(name="grey_to_rgb")([x, x, x])
        x = backbone(name, weights)(x)
    if dropout:
        x = keras.layers.Dropout(dropout)(x)
    # float32 output even under mixed precision: stable sigmoid and loss.
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="abnormal")(x)
    return keras.Model(inputs, outputs, name=model_name or name)
