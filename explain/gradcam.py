"""Grad-CAM heat maps for the project's Keras models, and their overlay on the input.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of a convolutional
feature map by the mean gradient of the output with respect to it, sums
the weighted channels, keeps the positive part and upsamples it to the
input: where the map is warm, the features the score rose with lie.

Which feature map: the one each global pooling (or flatten) of the network
summarizes, looked for through max/average pooling and dropout in front of
it: the last convolutional block's activations. That is ``activation_3``
(14x14) in the simple CNN, ``relu`` / ``conv5_block3_out`` /
``top_activation`` (7x7) in DenseNet121 / ResNet50 / EfficientNetB0, and
one per member in an ensemble, whose maps are upsampled and summed before
the ReLU (Grad-CAM over all the members' channels at once).

Which output: the logit (the sigmoid's input; for an ensemble the mean of
the members' logits), not the probability, whose gradient vanishes where
the sigmoid saturates, which is where the confident errors a gallery shows
lie.

How: the model is rebuilt as one flat graph (nested backbones and ensemble
members inlined, their layers copied under unique names with the trained
weights, the sigmoid output made linear) that outputs the chosen feature
maps and the logit; :mod:`keras.models.clone_model` does the inlining, so no
private Keras API is used. Keras and TensorFlow are imported inside the
functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Layers looked through from a global pooling back to the feature map it summarizes.
_PASS_THROUGH = ("MaxPooling2D", "AveragePooling2D", "Dropout", "SpatialDropout2D")
#: Heat maps are computed this many images at a time.
BATCH = 8


class Explainer:
    """A model's Grad-CAM: build once (seconds for a DenseNet), then :meth:`heatmaps`."""

    def __init__(self, model: Any) -> None:
        import keras

        flat, maps, names = _flat_graph(model)
        self.layers: list[str] = names
        self._model = keras.Model(flat.inputs, [*maps, flat.outputs[0]])

    def heatmaps(self, images: np.ndarray) -> np.ndarray:
        """Heat maps in [0, 1] (each image's maximum 1, or all 0) of the input's height and width.

        Args:
            images: ``(n, height, width, channels)`` model inputs.
        """
        images = np.asarray(images, dtype=np.float32)
        return np.concatenate(
            [self._batch(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
        )

    def _batch(self, images: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        size = images.shape[1:3]
        x = tf.convert_to_tensor(images)
        with tf.GradientTape() as tape:
            *maps, logit = self._model(x, training=False)
            # Images are independent (inference mode): one backward pass for the batch.
            total = tf.reduce_sum(tf.cast(logit, tf.float32))
        gradients = tape.gradient(total, maps)
        heat = tf.zeros((len(images), *size), tf.float32)
        for feature_map, gradient in zip(maps, gradients, strict=True):
            feature_map = tf.cast(feature_map, tf.float32)
            weights = tf.reduce_mean(tf.cast(gradient, tf.float32), axis=(1, 2), keepdims=True)
            cam = tf.reduce_sum(weights * feature_map, axis=-1, keepdims=True)
            heat += tf.image.resize(cam, size, method="bilinear")[..., 0]
        heat = np.maximum(heat.numpy(), 0.0)
        peak = heat.max(axis=(1, 2), keepdims=True)
        return np.where(peak > 0, heat / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)


def _flat_graph(model: Any) -> tuple[Any, list[Any], list[str]]:
    """(the flat model with a logit output, the feature maps to explain, their layers' names)."""
    import keras

    copies: list[tuple[Any, Any]] = []
    original: dict[int, Any] = {}  # id(copy) -> the model's own layer
    # id(tensor) -> (the layer that made it, its input when it had one)
    produced: dict[int, tuple[Any, Any]] = {}
    collapses: list[Any] = []  # inputs of the layers that collapse a 4-D map
    # Which collapses a tensor is computed from; a collapse that a later 4-D
    # tensor is computed from (squeeze-and-excitation) summarizes no final map.
    after: dict[int, frozenset[int]] = {}
    fed_back: set[int] = set()
    last: list[Any] = []

    def copy(layer: Any) -> Any:
        if isinstance(layer, keras.Model):
            return layer  # inlined by call() below
        config = layer.get_config()
        config["name"] = f"{layer.name}_{len(copies)}"
        if isinstance(layer, keras.layers.Dense) and layer.activation is keras.activations.sigmoid:
            config["activation"] = "linear"
        twin = layer.__class__.from_config(config)
        copies.append((layer, twin))
        original[id(twin)] = layer
        return twin

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(layer, keras.Model):
            # clone_model returns a copy cut loose from this graph; the tensor
            # connected to it is the output of the last layer it called.
            keras.models.clone_model(
                layer, input_tensors=args[0], clone_function=copy, call_function=call
            )
            return last[-1]
        output = layer(*args, **kwargs)
        first = args[0]
        inputs = list(first) if isinstance(first, list | tuple) else [first]
        ancestry = frozenset().union(*(after.get(id(t), frozenset()) for t in inputs))
        if len(output.shape) == 4:
            fed_back.update(ancestry)
        elif len(inputs) == 1 and len(first.shape) == 4:
            ancestry |= {len(collapses)}
            collapses.append(first)
        after[id(output)] = ancestry
        produced[id(output)] = (layer, first if len(inputs) == 1 else None)
        last.append(output)  # also keeps every tensor alive: their ids stay unique
        return output

    flat = keras.models.clone_model(model, clone_function=copy, call_function=call)
    for layer, twin in copies:
        twin.set_weights(layer.get_weights())
    maps, names = [], []
    for index, tensor in enumerate(collapses):
        if index in fed_back:
            continue
        layer, source = produced[id(tensor)]
        while type(layer).__name__ in _PASS_THROUGH and id(source) in produced:
            tensor = source
            layer, source = produced[id(tensor)]
        maps.append(tensor)
        names.append(original[id(layer)].name)
    if not maps:
        raise ValueError(
            f"model {model.name!r} has no convolutional feature map that a global pooling "
            "or flatten summarizes: Grad-CAM needs one"
        )
    return flat, maps, names


def overlay(image: np.ndarray, heat: np.ndarray, gap: int = 4) -> np.ndarray:
    """The grey input beside it with the heat map overlaid: ``(h, 2w + gap, 3)`` uint8.

    The heat map (jet colours) is blended in with an opacity that grows with
    the heat, so cool regions show the image as it is.
    """
    from matplotlib import colormaps

    grey = np.clip(np.asarray(image, dtype=np.float32).reshape(heat.shape), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    colours = colormaps["jet"](heat)[..., :3]
    alpha = 0.6 * heat[..., None]
    blended = rgb * (1 - alpha) + colours * alpha
    spacer = np.ones((heat.shape[0], gap, 3), dtype=np.float32)
    both = np.concatenate([rgb, spacer, blended], axis=1)
    return np.rint(both * 255).astype(np.uint8)
