"""Input-pipeline headroom: images/s tf.data delivers against images/s a training step consumes.

What it measures, on preprocessed TFRecord shards (the ``train`` split of
``--data_dir``; without it, a synthetic archive of ``--patients`` patients
with 256-512 px images is written with ``xray-synth`` and preprocessed with
``xray-preprocess`` on the local in-memory runner, cached under ``--workdir``):

* ``input``: :func:`trainer.data.training_dataset` with the default
  :class:`trainer.config.TrainConfig` (augmentation on) iterated alone for
  ``--batches`` batches after ``--warmup`` batches: images/s delivered. The
  same with ``augment=False`` (``input_no_augment``) shows what augmentation
  costs. The dataset is built once per measure and reused across repeats,
  so its start-up (file listing, shuffle buffer fill) is part of the warm-up.
* ``train`` (per model): the model built and compiled as ``trainer/fit.py``
  does (Adam, ``BinaryCrossentropy(reduction="mean_with_sample_weight")``,
  weighted AUC/accuracy/precision/recall), then ``model.train_on_batch`` on
  one cached batch with per-example weights (class weights become sample
  weights in ``fit``), ``--steps`` steps after ``--warmup`` steps: images/s
  consumed, with input costing nothing.
* ``ratio`` = input images/s / train images/s per model; the target is
  ratio >= 5 (the input pipeline is then never the bottleneck, with room for
  the two to share the CPU).

Both run on the same CPU cores, one after the other: in real training they
share them, so the ratio is an upper bound on the headroom. The machine may be
shared and noisy, so the measures are interleaved round-robin over
``--repeats`` rounds (input, input without augmentation, each model); the
median and the best of the rounds are reported, and the ratio uses medians.

Run from the repository root::

    .venv/bin/python benchmarks/input_pipeline.py --workdir /tmp/ipb
    .venv/bin/python benchmarks/input_pipeline.py --data_dir PREPROCESSED --models simple_cnn

The result is one JSON document on stdout; progress is logged to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TARGET_RATIO = 5.0
DEFAULT_MODELS = ("simple_cnn", "densenet121")
#: Bump when the generated data set changes, so cached sets are rebuilt.
_DATA_VERSION = 1
_DATA_MARKER = "synthetic.json"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from trainer.models import MODEL_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--data_dir",
        default=None,
        help="preprocessed shards (train/*.tfrecord.gz); default: a synthetic set in --workdir",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="cache of the synthetic set (default: a temporary directory, removed after)",
    )
    parser.add_argument(
        "--patients", type=int, default=60, help="patients in the synthetic archive"
    )
    parser.add_argument(
        "--image_size",
        default="256-512",
        metavar="MIN-MAX",
        help="side range of the synthetic DICOMs (records are 224x224 whatever it is)",
    )
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated names from {', '.join(MODEL_NAMES)}",
    )
    parser.add_argument("--global_batch_size", type=int, default=32, help="images per batch")
    parser.add_argument("--batches", type=int, default=30, help="timed input batches per round")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per round")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed batches / steps before the first round"
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data and model seed")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODEL_NAMES]
    if unknown or not args.models:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODEL_NAMES)}")
    for name in ("global_batch_size", "batches", "steps", "repeats", "patients"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    low, _, high = args.image_size.partition("-")
    try:
        args.image_size = (int(low), int(high or low))
    except ValueError:
        parser.error(f"--image_size: expected N or MIN-MAX, got {args.image_size!r}")
    return args


def _cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


def _machine() -> dict[str, Any]:
    import keras
    import numpy as np
    import tensorflow as tf

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": _cores(),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


# --------------------------------------------------------------------------
# Data


def ensure_synthetic(workdir: Path, patients: int, size: tuple[int, int], seed: int) -> Path:
    """Writes (or reuses) a synthetic archive preprocessed into shards.

    Returns:
        The preprocessed output directory (``train/``, ``manifest.json``, ...).
    """
    from archive_tools import synth
    from beam_pipelines import preprocess

    params = {"version": _DATA_VERSION, "patients": patients, "size": list(size), "seed": seed}
    root = workdir / f"synthetic_n{patients}_{size[0]}-{size[1]}_s{seed}"
    marker = root / _DATA_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("params") == params:
        logger.info("reusing preprocessed set %s", root)
        return root / "preprocessed"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    start = time.perf_counter()
    logger.info("writing a %d-patient synthetic archive to %s", patients, root)
    synth.run(
        [
            "--output_dir",
            str(root / "archive"),
            "--patients",
            str(patients),
            "--seed",
            str(seed),
            "--min_size",
            str(size[0]),
            "--max_size",
            str(size[1]),
            "--workers",
            str(_cores()),
        ]
    )
    logger.info("preprocessing it")
    preprocess.run(
        [
            "--metadata",
            str(root / "archive" / "metadata.csv"),
            "--output_dir",
            str(root / "preprocessed"),
            "--seed",
            str(seed),
            "--runner=FnApiRunner",
            "--direct_running_mode=in_memory",
        ]
    )
    marker.write_text(
        json.dumps({"params": params, "seconds": round(time.perf_counter() - start, 1)})
    )
    return root / "preprocessed"


def _train_count(data_dir: str) -> int | None:
    import tensorflow as tf

    path = f"{data_dir.rstrip('/')}/manifest.json"
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "rb") as handle:
        counts = json.loads(handle.read()).get("counts", {}).get("train")
    return sum(counts.values()) if counts else None


# --------------------------------------------------------------------------
# Measures


def _summary(rates: list[float]) -> dict[str, Any]:
    return {
        "images_per_s": round(statistics.median(rates), 1),
        "images_per_s_best": round(max(rates), 1),
        "rounds": [round(r, 1) for r in rates],
    }


class InputMeasure:
    """Iterates one training dataset; each call times ``batches`` batches."""

    def __init__(self, config: Any, files: list[str], warmup: int) -> None:
        from trainer import data

        self.batch_size = config.global_batch_size
        self.iterator = iter(data.training_dataset(config, files))
        for _ in range(warmup):
            next(self.iterator)

    def __call__(self, batches: int) -> float:
        start = time.perf_counter()
        for _ in range(batches):
            images, _labels = next(self.iterator)
        images.numpy()  # the batch exists on the host, not just as a handle
        return batches * self.batch_size / (time.perf_counter() - start)


class TrainMeasure:
    """One compiled model and one cached batch; each call times ``steps`` steps."""

    def __init__(self, name: str, batch: tuple[Any, Any], pixel_stats: dict[str, float]) -> None:
        import keras
        import tensorflow as tf

        from trainer.models import build_model

        model = build_model(
            name,
            pixel_mean=pixel_stats.get("mean") or 0.5,
            pixel_std=pixel_stats.get("std") or 0.25,
        )
        # As trainer/fit.py compiles it (default config: no XLA, no cosine).
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.BinaryCrossentropy(reduction="mean_with_sample_weight"),
            weighted_metrics=[
                keras.metrics.AUC(name="auc"),
                keras.metrics.BinaryAccuracy(name="accuracy"),
                keras.metrics.Precision(name="precision"),
                keras.metrics.Recall(name="recall"),
            ],
        )
        self.model = model
        self.parameters = int(model.count_params())
        images, labels = batch
        self.images = tf.constant(images)
        self.labels = tf.cast(tf.reshape(labels, (-1, 1)), tf.float32)
        self.weights = tf.ones(tf.shape(labels)[0], tf.float32)
        self.batch_size = int(images.shape[0])

    def step(self) -> None:
        self.model.train_on_batch(self.images, self.labels, sample_weight=self.weights)

    def __call__(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return steps * self.batch_size / (time.perf_counter() - start)


def _timed(label: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = fn()
    logger.info("%s: %.1f s", label, time.perf_counter() - start)
    return value


def _benchmark(args: argparse.Namespace, data_dir: str) -> dict[str, Any]:
    import keras

    from trainer import data
    from trainer.config import TrainConfig

    keras.utils.set_random_seed(args.seed)
    files = data.shard_files(data_dir, "train")
    config = TrainConfig(
        data_dir=data_dir,
        output_dir=args.workdir or ".",
        global_batch_size=args.global_batch_size,
        seed=args.seed,
    )
    no_augment = dataclasses.replace(config, augment=False)
    stats: dict[str, float] = {}
    manifest_path = Path(data_dir, "manifest.json")
    if manifest_path.is_file():
        stats = json.loads(manifest_path.read_text()).get("train_pixel_stats") or {}

    measures: dict[str, Callable[[], float]] = {}
    input_aug = _timed(
        "input pipeline warm-up", lambda: InputMeasure(config, files, max(1, args.warmup))
    )
    input_plain = _timed(
        "input pipeline (no augmentation) warm-up",
        lambda: InputMeasure(no_augment, files, max(1, args.warmup)),
    )
    measures["input"] = lambda: input_aug(args.batches)
    measures["input_no_augment"] = lambda: input_plain(args.batches)
    # One real batch (unaugmented: augmentation does not change a step's cost).
    batch = next(input_plain.iterator)
    trainers: dict[str, TrainMeasure] = {}
    for name in args.models:
        trainer = _timed(f"{name} build", lambda n=name: TrainMeasure(n, batch, stats))
        # The first step traces and compiles the train function.
        _timed(f"{name} first step", trainer.step)
        for _ in range(max(0, args.warmup - 1)):
            trainer.step()
        trainers[name] = trainer
        measures[f"train/{name}"] = lambda t=trainer: t(args.steps)

    rates: dict[str, list[float]] = {key: [] for key in measures}
    for round_ in range(args.repeats):
        for key, measure in measures.items():
            rates[key].append(measure())
            logger.info("round %d %s: %.1f images/s", round_ + 1, key, rates[key][-1])

    input_rate = statistics.median(rates["input"])
    plain_rate = statistics.median(rates["input_no_augment"])
    models = []
    for name, trainer in trainers.items():
        train_rate = statistics.median(rates[f"train/{name}"])
        ratio = input_rate / train_rate
        models.append(
            {
                "model": name,
                "parameters": trainer.parameters,
                "train": {
                    **_summary(rates[f"train/{name}"]),
                    "ms_per_step": round(1000.0 * trainer.batch_size / train_rate, 1),
                },
                "ratio": round(ratio, 2),
                "ratio_no_augment": round(plain_rate / train_rate, 2),
                "within_target": ratio >= TARGET_RATIO,
            }
        )
    return {
        "input": _summary(rates["input"]),
        "input_no_augment": _summary(rates["input_no_augment"]),
        "augmentation_cost_fraction": round(1.0 - input_rate / plain_rate, 3),
        "models": models,
        "shards": len(files),
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Prepares the data, times the input pipeline and the training steps.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The JSON-ready report: machine, settings, data, input rates and one
        result per model (images/s medians over the rounds, and the ratio).
    """
    args = _parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="input_pipeline_") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        synthetic = args.data_dir is None
        data_dir = str(
            ensure_synthetic(workdir, args.patients, args.image_size, args.seed)
            if synthetic
            else args.data_dir
        )
        train_images = _train_count(data_dir)
        results = _benchmark(args, data_dir)
    return {
        "machine": _machine(),
        "settings": {
            "models": args.models,
            "global_batch_size": args.global_batch_size,
            "batches": args.batches,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
        "data": {
            # A temporary synthetic set is gone by now: no path to report.
            "data_dir": data_dir if args.workdir or not synthetic else None,
            "synthetic": synthetic,
            "patients": args.patients if synthetic else None,
            "train_images": train_images,
            "shards": results.pop("shards"),
        },
        "target_ratio": TARGET_RATIO,
        **results,
        "notes": [
            "input: trainer.data.training_dataset, default TrainConfig (augmentation on), "
            "iterated alone",
            "train: model.train_on_batch on one cached batch, compiled as trainer/fit.py does",
            "ratio = median input images/s / median train images/s; target >= 5",
            "both use the same cores one after the other; in training they share them",
        ],
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: prints the report as JSON on stdout."""
    # force: importing Beam/TF already logged through the root logger, which installed
    # a WARNING-level handler that would otherwise hide this script's progress.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    # Beam's own INFO lines (type-hint conversions, runner state) drown the progress.
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    print(json.dumps(run(argv), indent=2))


if __name__ == "__main__":
    main()
