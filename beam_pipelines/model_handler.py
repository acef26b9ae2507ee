"""A RunInference model handler for the trainer's exported Keras model.

Beam's own ``TFModelHandlerNumpy`` needs ``tensorflow_hub`` and loads with
``tf.keras.models.load_model``, which Keras 3 no longer accepts for
SavedModels. This handler loads ``model.keras`` from the exported model
folder with ``safe_mode=True`` (no arbitrary code from an untrusted file),
once per worker process, and scores batches. A batch that raises is retried
image by image so that one bad input fails alone: its result carries the
error instead of a score, and the job goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

logger = logging.getLogger(__name__)

KERAS_FILE = "model.keras"


class InferenceError:
    """Stands in a PredictionResult's ``inference`` when scoring an input failed."""

    def __init__(self, detail: str) -> None:
        self.detail = detail

    def __repr__(self) -> str:
        return f"InferenceError({self.detail!r})"


class KerasModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
    """Scores (224, 224, 1) float32 images with the exported Keras model."""

    def __init__(self, model_dir: str, max_batch_size: int = 32) -> None:
        super().__init__()
        self._model_dir = model_dir.rstrip("/")
        self._max_batch_size = max_batch_size

    def load_model(self) -> Any:
        import os

        import keras
        from apache_beam.io.filesystems import FileSystems

        path = f"{self._model_dir}/{KERAS_FILE}"
        if "://" in path:
            # Keras reads local files; bring a remote model to the worker once.
            import tempfile

            local = os.path.join(tempfile.mkdtemp(prefix="xray-model-"), KERAS_FILE)
            with FileSystems.open(path) as source, open(local, "wb") as target:
                target.write(source.read())
            path = local
        return keras.saving.load_model(path, safe_mode=True)

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        try:
            scores = _scores(model, np.stack(batch))
            return [PredictionResult(x, s) for x, s in zip(batch, scores, strict=True)]
        except Exception:  # retried one by one below; the failing input is named there
            results = []
            for example in batch:
                try:
                    score: Any = _scores(model, example[None])[0]
                except Exception as exc:  # per input: reported as a reject
                    score = InferenceError(f"{type(exc).__name__}: {str(exc)[:200]}")
                results.append(PredictionResult(example, score))
            return results

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": self._max_batch_size}

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)


def _scores(model: Any, images: np.ndarray) -> list[float]:
    if images.ndim != 4 or images.shape[1:] != (224, 224, 1):
        raise ValueError(f"expected images of shape (n, 224, 224, 1), got {images.shape}")
    output = np.asarray(model(images.astype(np.float32), training=False)).reshape(-1)
    if not np.all(np.isfinite(output)):
        raise ValueError("the model returned a non-finite score")
    return [float(v) for v in output]
