"""beam_pipelines.transforms.inference: batches, and one bad input failing alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from beam_pipelines.transforms.inference import InferenceError, KerasModelHandler


def test_scores_and_isolates_a_failing_input(trained_model: Path) -> None:
    handler = KerasModelHandler(str(trained_model / "model"), max_batch_size=4)
    model = handler.load_model()
    good = np.zeros((224, 224, 1), np.float32)
    results = list(handler.run_inference([good, np.zeros((3, 3), np.float32), good], model))
    assert isinstance(results[1].inference, InferenceError)
    assert 0.0 <= results[0].inference <= 1.0 and results[0].inference == results[2].inference
    assert handler.batch_elements_kwargs()["max_batch_size"] == 4


def test_an_image_scores_the_same_whatever_shares_its_batch(trained_model: Path) -> None:
    # Batches are padded to one size, so scores do not depend on how a runner
    # cut its bundles into batches: a rerun writes the same bytes.
    handler = KerasModelHandler(str(trained_model / "model"), max_batch_size=8)
    model = handler.load_model()
    images = list(np.random.default_rng(0).random((8, 224, 224, 1), dtype=np.float32))
    together = [r.inference for r in handler.run_inference(images, model)]
    assert [r.inference for r in handler.run_inference(images[::-1], model)] == together[::-1]
    alone = [next(iter(handler.run_inference([x], model))).inference for x in images]
    assert alone == together
    assert handler.batch_elements_kwargs()["min_batch_size"] == 8  # full batches
