"""beam_pipelines.model_handler: batches, and one bad input failing alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from beam_pipelines.model_handler import InferenceError, KerasModelHandler


def test_scores_and_isolates_a_failing_input(trained_model: Path) -> None:
    handler = KerasModelHandler(str(trained_model / "model"), max_batch_size=4)
    model = handler.load_model()
    good = np.zeros((224, 224, 1), np.float32)
    results = list(handler.run_inference([good, np.zeros((3, 3), np.float32), good], model))
    assert isinstance(results[1].inference, InferenceError)
    assert 0.0 <= results[0].inference <= 1.0 and results[0].inference == results[2].inference
    assert handler.batch_elements_kwargs()["max_batch_size"] == 4
