"""trainer.models: every architecture builds, predicts and round-trips its config."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from trainer.models import MODEL_NAMES, build_model


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_architecture_builds_and_predicts(name: str) -> None:
    model = build_model(name, pixel_mean=0.4, pixel_std=0.2)
    assert model.input_shape == (None, 224, 224, 1)
    scores = model.predict(np.zeros((2, 224, 224, 1), np.float32), verbose=0)
    assert scores.shape == (2, 1)
    assert np.all((scores >= 0) & (scores <= 1))


def test_config_round_trip() -> None:
    model = build_model("simple_cnn", pixel_mean=0.3, pixel_std=0.1)
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(0).random((3, 224, 224, 1), dtype=np.float32)
    np.testing.assert_allclose(clone.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        build_model("vgg")
    with pytest.raises(ValueError):
        build_model("simple_cnn", pixel_std=0)
