"""Grad-CAM on toy models whose score depends on a planted bright square, and on the real ones."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from explain.gradcam import Explainer, overlay

SIZE = 64
SQUARE = 12
#: The square's top-left corner in each quadrant.
CORNERS = {
    "top left": (6, 8),
    "top right": (10, 42),
    "bottom left": (40, 12),
    "bottom right": (44, 46),
}


def _image(corner: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Noise below 0.4, a one-pixel bright line (a distractor) and the bright square."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.0, 0.4, (SIZE, SIZE)).astype(np.float32)
    image[SIZE // 2, 4:-4] = 1.0  # as bright as the square, too thin to count
    top, left = corner
    image[top : top + SQUARE, left : left + SQUARE] = 1.0
    return image[..., None]


def _features(name: str, excite: bool = False) -> keras.Model:
    """Responds where a 5x5 neighbourhood averages above 0.6: the square, not the line.

    ``excite``: a squeeze-and-excitation block after it (EfficientNet's), whose
    own global pooling is no summary of the output's feature map.
    """
    inputs = keras.Input((SIZE, SIZE, 1))
    conv = keras.layers.Conv2D(1, 5, padding="same", activation="relu", name="blob")
    x = conv(inputs)
    conv.set_weights([np.full((5, 5, 1, 1), 1 / 25, np.float32), np.array([-0.6], np.float32)])
    if excite:
        squeeze = keras.layers.GlobalAveragePooling2D(name="se_squeeze")(x)
        gate = keras.layers.Dense(1, activation="sigmoid", name="se_gate")
        weights = gate(squeeze)
        gate.set_weights([np.zeros((1, 1), np.float32), np.array([2.0], np.float32)])
        x = keras.layers.Multiply(name="se_excite")([x, keras.layers.Reshape((1, 1, 1))(weights)])
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="gap")(x), name=name)


def _head(x: keras.KerasTensor) -> keras.KerasTensor:
    dense = keras.layers.Dense(1, activation="sigmoid", name="abnormal")
    y = dense(keras.layers.Dropout(0.2)(x))
    dense.set_weights([np.array([[600.0]], np.float32), np.array([-2.0], np.float32)])
    return y


def _flat() -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 1))
    return keras.Model(inputs, _head(_features("flat")(inputs)))


def _nested() -> keras.Model:
    """An applications-like model: a backbone model inside, a head outside."""
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Normalization(mean=0.5, variance=0.0625, name="standardize")(inputs)
    backbone = _features("backbone", excite=True)
    x = backbone(keras.layers.Rescaling(0.25, offset=0.5)(x))  # undoes the standardization
    return keras.Model(inputs, _head(x))


def _ensemble() -> keras.Model:
    """Two members with the same layer names inside, averaged (trainer.export.average)."""
    members = [keras.Model(*_io(), name=f"member{i}") for i in range(2)]
    inputs = keras.Input((SIZE, SIZE, 1))
    output = keras.layers.Average(name="abnormal")([member(inputs) for member in members])
    return keras.Model(inputs, output)


def _io() -> tuple[keras.KerasTensor, keras.KerasTensor]:
    inputs = keras.Input((SIZE, SIZE, 1))
    return inputs, _head(_features("features")(inputs))


@pytest.mark.parametrize("build", [_flat, _nested, _ensemble], ids=["flat", "nested", "ensemble"])
@pytest.mark.parametrize("quadrant", sorted(CORNERS))
def test_the_heat_map_peaks_on_the_planted_square(build, quadrant: str) -> None:
    model = build()
    image = _image(CORNERS[quadrant])
    assert float(model(image[None])[0, 0]) > 0.9  # the square makes the score
    heat = Explainer(model).heatmaps(image[None])[0]
    assert heat.shape == (SIZE, SIZE) and heat.max() == pytest.approx(1.0)
    top, left = CORNERS[quadrant]
    row, column = np.unravel_index(np.argmax(heat), heat.shape)
    assert top <= row < top + SQUARE and left <= column < left + SQUARE
    inside = np.zeros_like(heat, dtype=bool)
    inside[max(top - 4, 0) : top + SQUARE + 4, max(left - 4, 0) : left + SQUARE + 4] = True
    assert heat[~inside].max() < 0.05, "heat away from the square (the bright line?)"


def test_the_feature_map_is_found_through_pooling_in_each_member() -> None:
    assert Explainer(_flat()).layers == ["blob"]
    assert Explainer(_nested()).layers == ["se_excite"]  # not the excitation's input
    assert Explainer(_ensemble()).layers == ["blob", "blob"]


def test_saturated_scores_still_get_a_map() -> None:
    """The gradient is the logit's: a score of 1.0 in float32 still has a heat map."""
    model = _flat()
    model.get_layer("abnormal").set_weights([np.array([[4000.0]]), np.array([0.0])])
    image = _image(CORNERS["top right"])
    assert float(model(image[None])[0, 0]) == 1.0
    heat = Explainer(model).heatmaps(image[None])[0]
    assert heat.max() == pytest.approx(1.0)


def test_an_image_without_evidence_gets_a_blank_map() -> None:
    image = np.full((1, SIZE, SIZE, 1), 0.2, np.float32)
    assert not Explainer(_flat()).heatmaps(image).any()


@pytest.mark.slow  # builds EfficientNetB0 and its gradients: 3-14 s on 2 cores
def test_the_project_models_explain_their_last_block() -> None:
    from trainer import models

    simple = Explainer(models.build_model("simple_cnn"))
    assert len(simple.layers) == 1 and simple.layers[0].startswith("activation")
    # Squeeze-and-excitation blocks pool too; only the map the output summarizes counts.
    efficient = Explainer(models.build_model("efficientnetb0"))
    assert efficient.layers == ["top_activation"]
    images = np.random.default_rng(0).uniform(size=(2, 224, 224, 1)).astype(np.float32)
    heat = efficient.heatmaps(images)
    assert heat.shape == (2, 224, 224) and np.isfinite(heat).all()


def test_overlay_keeps_cool_regions_grey() -> None:
    image = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4, 1)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 1.0
    picture = overlay(image, heat, gap=2)
    assert picture.shape == (4, 10, 3) and picture.dtype == np.uint8
    grey = np.rint(image[..., 0] * 255).astype(np.uint8)
    assert (picture[:, :4, 0] == grey).all()  # the input as it is
    right = picture[:, 6:]
    assert (right[1:, :, 1] == grey[1:]).all()  # no heat: unchanged
    assert tuple(right[0, 0]) != (grey[0, 0],) * 3  # heat: coloured
