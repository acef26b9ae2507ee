"""A RunInference model handler for the trainer's exported Keras model.

Beam's own ``TFModelHandlerNumpy`` needs ``tensorflow_hub`` and loads with
``tf.keras.models.load_model``, which Keras 3 no longer accepts for
SavedModels. This handler loads ``model.keras`` from the exported model
folder with ``safe_mode=True`` (no arbitrary code from an untrusted file),
once per worker process, and scores batches. A batch that raises is retried
image by image so that one bad input fails alone: its result carries the
error instead of a score, and the job goes on.

Every batch is padded with blank images to ``max_batch_size`` before the
model sees it. CPU kernels give last-bit different results for different
batch sizes, and which images share a batch depends on how a runner cut its
bundles; at one fixed size an image's score depends on nothing else (measured:
bit-identical at every position and batch composition), so a rerun, after a
crash or not, writes the same bytes.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

logger = logging.getLogger(__name__)

KERAS_FILE = "model.keras"


def model_card_path(model_dir: str) -> str:
    """The trainer's ``model_card.json`` beside an exported model folder (RESULTS/model)."""
    return f"{posixpath.dirname(model_dir.rstrip('/'))}/model_card.json"


def model_file_problem(model_dir: str) -> str | None:
    """Why ``model_dir`` holds no loadable ``model.keras``, or None (no TensorFlow needed).

    Checks what Keras needs to load the file: a whole zip archive (every
    member's CRC) holding a parseable ``config.json`` and the weights.
    """
    import io
    import json
    import zipfile

    from beam_pipelines.storage.files import input_file_problem, read_bytes

    path = f"{model_dir.rstrip('/')}/{KERAS_FILE}"
    problem = input_file_problem(path)
    if problem:
        return f"{path} {problem} (is --model RESULTS/model?)"
    try:
        with zipfile.ZipFile(io.BytesIO(read_bytes(path))) as archive:
            damaged = archive.testzip()
            names = set(archive.namelist())
            if damaged is None and "config.json" in names:
                json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        return f"{path} is not a readable Keras model file ({type(exc).__name__}: {exc})"
    if damaged is not None:
        return f"{path} is damaged (member {damaged} fails its CRC check)"
    if "config.json" not in names or "model.weights.h5" not in names:
        return f"{path} is not a Keras model file (no config.json or model.weights.h5 inside)"
    return None


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
        return _run(batch, model, self._max_batch_size)

    def batch_elements_kwargs(self) -> dict[str, Any]:
        # Full batches: every batch is padded to this size anyway.
        size = self._max_batch_size
        return {"min_batch_size": size, "max_batch_size": size}

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)


def _run(batch: Sequence[np.ndarray], model: Any, pad_to: int) -> list[PredictionResult]:
    try:
        scores = _scores(model, np.stack(batch), pad_to)
        return [PredictionResult(x, s) for x, s in zip(batch, scores, strict=True)]
    except Exception:  # retried one by one below; the failing input is named there
        results = []
        for example in batch:
            try:
                score: Any = _scores(model, example[None], pad_to)[0]
            except Exception as exc:  # per input: reported as a reject
                score = InferenceError(f"{type(exc).__name__}: {str(exc)[:200]}")
            results.append(PredictionResult(example, score))
        return results


def _scores(model: Any, images: np.ndarray, pad_to: int = 1) -> list[float]:
    if images.ndim != 4 or images.shape[1:] != (224, 224, 1):
        raise ValueError(f"expected images of shape (n, 224, 224, 1), got {images.shape}")
    count = len(images)
    images = images.astype(np.float32)
    if count < pad_to:
        images = np.concatenate([images, np.zeros((pad_to - count, *images.shape[1:]), np.float32)])
    output = np.asarray(model(images, training=False)).reshape(-1)[:count]
    if not np.all(np.isfinite(output)):
        raise ValueError("the model returned a non-finite score")
    return [float(v) for v in output]
