"""Scoring throughput: the ``xray-score`` Beam job on all cores against a bare Python loop.

What it measures, per transfer syntax (``explicit_le`` and ``j2k`` by
default), on the same archives of synthetic 12-bit MONOCHROME2 radiographs
as ``benchmarks/preprocess_throughput.py`` (its generator and cache are
reused, so a shared ``--workdir`` reuses its archives), with a trained
``--model`` (default: ``simple_cnn`` trained for 2 steps on a tiny
synthetic set and cached under ``--workdir``; its quality does not matter,
only its cost per image):

* ``bare_loop``: in this process, one image after another,
  :func:`beam_pipelines.dicom.decode` -> :func:`beam_pipelines.dicom.to_model_input`
  -> :func:`beam_pipelines.contracts.records.as_stored`, batched by ``--batch_size`` (32)
  and scored with ``model(batch, training=False)`` as the job's model handler
  does. The model is loaded, one image decoded and one full batch scored
  first, untimed. ``decode_seconds`` and ``predict_seconds`` split the time;
  ``cpu_per_wall`` > 1 means the loop already used more than one core
  (TensorFlow's thread pools, codec threads).
* ``pipeline``: ``python -m beam_pipelines.score --model ... --metadata ...
  --output ...`` in a subprocess with the job's default runner (the local
  FnApiRunner, which is what Beam's DirectRunner runs batch jobs on, in
  multi_processing mode with one worker per core). Its wall time includes the
  fixed start-up (interpreter, TensorFlow and Beam imports, worker processes,
  one model load per worker), so the job is also run on a 2-image archive and
  ``marginal_images_per_s`` = (N - 2) / (wall_N - wall_2) estimates the rate
  without it. Peak memory is the largest sum of RSS over the subprocess and
  all its descendants (an upper bound: shared pages count once per process).
* ``ratio`` = pipeline images/s / (usable cores x bare-loop images/s); the
  target is ratio >= 0.85. ``ratio_marginal`` uses the marginal rate.

The machine may be shared and noisy: ``--repeats`` rounds run every
measurement of an encoding back to back (bare loop, pipeline, 2-image
pipeline); rates and ratios are the medians over rounds, with the minimum and
maximum as the spread, and every round is kept in the report.

Run from the repository root::

    .venv/bin/python benchmarks/score_throughput.py
    .venv/bin/python benchmarks/score_throughput.py --workdir /tmp/ptb --repeats 3
    .venv/bin/python benchmarks/score_throughput.py --images 20 --encodings j2k

The result is one JSON document on stdout; progress is logged to stderr.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import psutil

from archive_tools.dicom_writer import ENCODINGS
from beam_pipelines import dicom, malloc_tuning
from beam_pipelines.contracts import records
from beam_pipelines.contracts.metadata import DICOM_PATH

logger = logging.getLogger(__name__)


def _sibling(name: str) -> ModuleType:
    """Another script of this folder (``benchmarks/`` is not a package): loaded by path.

    Registered in ``sys.modules`` so that its functions pickle by reference
    (its archive writer runs in a fork pool).
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_throughput = _sibling("preprocess_throughput")
_input_pipeline = _sibling("input_pipeline")

DEFAULT_ENCODINGS = _throughput.DEFAULT_ENCODINGS
TARGET_RATIO = _throughput.TARGET_RATIO
OVERHEAD_IMAGES = _throughput.OVERHEAD_IMAGES
BATCH_SIZE = 32
#: Bump when the cached model's recipe changes, so it is retrained.
_MODEL_VERSION = 1
_MODEL_MARKER = "benchmark_model.json"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    _throughput.add_archive_arguments(
        parser, "cache of archives, model and outputs (default: <tmp>/score_throughput)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="an exported model folder (RESULTS/model); default: train a tiny simple_cnn",
    )
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="inference batch")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per encoding")
    args = parser.parse_args(argv)
    _throughput.check_archive_arguments(parser, args)
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch_size and --repeats must be positive")
    if args.model and not Path(args.model, "model.keras").is_file():
        parser.error(f"--model {args.model} has no model.keras")
    return args


# --------------------------------------------------------------------------
# Model


def ensure_model(workdir: Path, seed: int) -> Path:
    """Trains (or reuses) a tiny ``simple_cnn``: 1 epoch of 2 steps on a small synthetic set.

    Returns:
        The exported model folder (``RESULTS/model``, holding ``model.keras``).
    """
    params = {"version": _MODEL_VERSION, "model": "simple_cnn", "seed": seed}
    results = workdir / f"model_simple_cnn_s{seed}"
    marker = results / _MODEL_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("params") == params:
        logger.info("reusing model %s", results / "model")
        return results / "model"
    data_dir = _input_pipeline.ensure_synthetic(workdir, 24, (64, 96), seed)
    if results.exists():
        shutil.rmtree(results)
    start = time.perf_counter()
    logger.info("training a tiny simple_cnn into %s", results)
    # A subprocess: training's TensorFlow set-up (strategy, seeds) stays out of
    # the process that times the bare loop.
    command = [
        sys.executable,
        "-m",
        "trainer.train",
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(results),
        "--model",
        "simple_cnn",
        "--epochs",
        "1",
        "--steps_per_epoch",
        "2",
        "--global_batch_size",
        "8",
        "--seed",
        str(seed),
        "--verbose",
        "0",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"training exited with {done.returncode}:\n{done.stderr[-2000:]}")
    marker.write_text(
        json.dumps({"params": params, "seconds": round(time.perf_counter() - start, 1)})
    )
    return results / "model"


# --------------------------------------------------------------------------
# Measurements


def _model_input(path: Path) -> np.ndarray:
    """One image as DecodeForScoringFn hands it to the model."""
    return records.as_stored(dicom.to_model_input(dicom.decode(str(path)).image))


def bare_loop(metadata: str, model_dir: str, batch_size: int) -> dict[str, Any]:
    """Decode, resize, quantize and score every row in this process, in batches."""
    import keras

    root = Path(metadata).parent
    with open(metadata, newline="", encoding="utf-8") as handle:
        paths = [root / row[DICOM_PATH] for row in csv.DictReader(handle)]
    # The job's decode stage tunes malloc in its setup(); so does the loop.
    malloc_tuning.keep_freed_buffers()
    # Warm-up, untimed: model load, codec plugins, one full-size batch.
    model = keras.saving.load_model(str(Path(model_dir, "model.keras")), safe_mode=True)
    first = _model_input(paths[0])
    np.asarray(model(np.stack([first] * batch_size), training=False))

    process = psutil.Process()
    cpu_before = sum(process.cpu_times()[:2])
    decode_seconds = predict_seconds = 0.0
    scores: list[float] = []
    batch: list[np.ndarray] = []
    start = time.perf_counter()
    for index, path in enumerate(paths):
        tick = time.perf_counter()
        batch.append(_model_input(path))
        decode_seconds += time.perf_counter() - tick
        if len(batch) == batch_size or index == len(paths) - 1:
            tick = time.perf_counter()
            output = model(np.stack(batch).astype(np.float32), training=False)
            scores.extend(np.asarray(output).reshape(-1).tolist())
            predict_seconds += time.perf_counter() - tick
            batch = []
    seconds = time.perf_counter() - start
    cpu = sum(process.cpu_times()[:2]) - cpu_before
    return {
        "images": len(scores),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(scores) / seconds, 3),
        "decode_seconds": round(decode_seconds, 3),
        "predict_seconds": round(predict_seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "cpu_per_wall": round(cpu / seconds, 3),
    }


def run_pipeline(
    metadata: str, model_dir: str, output: Path, batch_size: int, interval: float
) -> dict[str, Any]:
    """Runs the scoring job in a subprocess; wall time and peak RSS of its tree."""
    if output.parent.exists():
        shutil.rmtree(output.parent)
    output.parent.mkdir(parents=True)
    log_path = output.parent.with_suffix(".log")
    command = [
        sys.executable,
        "-m",
        "beam_pipelines.score",
        "--model",
        model_dir,
        "--metadata",
        metadata,
        "--output",
        str(output),
        "--batch_size",
        str(batch_size),
    ]
    with log_path.open("w") as log:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        sampler = _throughput._TreeSampler(child.pid, interval)
        sampler.start()
        code = child.wait()
        seconds = time.perf_counter() - start
        sampler.stop()
    if code != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"xray-score exited with {code}; log {log_path}:\n{tail}")
    summary = json.loads(Path(f"{output}.summary.json").read_text())
    return {
        "images": summary["scored"],
        "rejected": summary["rejected"],
        "seconds": round(seconds, 3),
        "images_per_s": round(summary["scored"] / seconds, 3),
        "peak_rss_bytes": sampler.peak_rss,
        "peak_rss_mib": round(sampler.peak_rss / 2**20, 1),
        "peak_processes": sampler.peak_processes,
        "cpu_seconds_seen": round(sampler.cpu_seconds, 3),
        "rss_samples": sampler.samples,
        "log": str(log_path),
    }


def _round(
    args: argparse.Namespace, model_dir: str, archive: dict, tiny: dict | None, runs: Path
) -> dict[str, Any]:
    """One round for one encoding: bare loop, pipeline, then the 2-image pipeline."""
    cores = _throughput._cores()
    bare = bare_loop(archive["metadata"], model_dir, args.batch_size)
    logger.info(
        "bare loop %.2f images/s (cpu/wall %.2f)", bare["images_per_s"], bare["cpu_per_wall"]
    )
    pipeline = run_pipeline(
        archive["metadata"],
        model_dir,
        runs / "pipeline" / "predictions",
        args.batch_size,
        args.sample_interval,
    )
    logger.info("pipeline %.2f images/s in %.1f s", pipeline["images_per_s"], pipeline["seconds"])
    overhead, marginal = None, None
    if tiny is not None:
        overhead = run_pipeline(
            tiny["metadata"],
            model_dir,
            runs / "overhead" / "predictions",
            args.batch_size,
            args.sample_interval,
        )
        logger.info("%d-image pipeline %.1f s", OVERHEAD_IMAGES, overhead["seconds"])
        extra_seconds = pipeline["seconds"] - overhead["seconds"]
        if extra_seconds > 0:
            marginal = (args.images - OVERHEAD_IMAGES) / extra_seconds
    ideal = cores * bare["images_per_s"]
    return {
        "bare_loop": bare,
        "pipeline": pipeline,
        "pipeline_overhead_run": overhead,
        "marginal_images_per_s": round(marginal, 3) if marginal is not None else None,
        "ideal_images_per_s": round(ideal, 3),
        "ratio": round(pipeline["images_per_s"] / ideal, 3),
        "ratio_marginal": round(marginal / ideal, 3) if marginal is not None else None,
    }


def _spread(values: list[float | None]) -> dict[str, Any] | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return {
        "median": round(statistics.median(known), 3),
        "min": round(min(known), 3),
        "max": round(max(known), 3),
        "n": len(known),
    }


def _encoding(
    args: argparse.Namespace, workdir: Path, model_dir: str, encoding: str
) -> dict[str, Any]:
    archive = _throughput.ensure_archive(workdir, encoding, args.images, args.size, args.seed)
    tiny = None
    if not args.skip_overhead:
        tiny = _throughput.ensure_archive(workdir, encoding, OVERHEAD_IMAGES, args.size, args.seed)
    # Not "runs/": preprocess_throughput writes there when the workdir is shared.
    runs = workdir / "score_runs" / encoding
    runs.mkdir(parents=True, exist_ok=True)
    rounds = []
    for index in range(args.repeats):
        logger.info(
            "%s: round %d of %d over %d images", encoding, index + 1, args.repeats, args.images
        )
        rounds.append(_round(args, model_dir, archive, tiny, runs))
    ratio = _spread([r["ratio"] for r in rounds])
    ratio_marginal = _spread([r["ratio_marginal"] for r in rounds])
    return {
        "encoding": encoding,
        "transfer_syntax_name": ENCODINGS[encoding].name,
        "archive": {k: archive[k] for k in ("params", "bytes", "seconds_to_generate", "generated")},
        "bare_images_per_s": _spread([r["bare_loop"]["images_per_s"] for r in rounds]),
        "bare_cpu_per_wall": _spread([r["bare_loop"]["cpu_per_wall"] for r in rounds]),
        "pipeline_images_per_s": _spread([r["pipeline"]["images_per_s"] for r in rounds]),
        "pipeline_peak_rss_mib": _spread([r["pipeline"]["peak_rss_mib"] for r in rounds]),
        "overhead_seconds": _spread(
            [
                r["pipeline_overhead_run"]["seconds"] if r["pipeline_overhead_run"] else None
                for r in rounds
            ]
        ),
        "marginal_images_per_s": _spread([r["marginal_images_per_s"] for r in rounds]),
        "ratio": ratio,
        "ratio_marginal": ratio_marginal,
        "within_target": ratio is not None and ratio["median"] >= TARGET_RATIO,
        "within_target_marginal": ratio_marginal is not None
        and ratio_marginal["median"] >= TARGET_RATIO,
        "rounds": rounds,
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes (or reuses) the archives and the model, times both paths, returns the report.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The JSON-ready report: machine, settings and one result per encoding.
    """
    args = _parse_args(argv)
    workdir = Path(args.workdir or Path(tempfile.gettempdir(), "score_throughput"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir = str(Path(args.model) if args.model else ensure_model(workdir, args.seed))
    results = [_encoding(args, workdir, model_dir, encoding) for encoding in args.encodings]
    return {
        "machine": _throughput._machine(),
        "settings": {
            "images": args.images,
            "size": list(args.size),
            "bits_stored": _throughput.BITS_STORED,
            "photometric": "MONOCHROME2",
            "encodings": args.encodings,
            "model": model_dir,
            "trained_here": args.model is None,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "runner": "beam_pipelines.score default: FnApiRunner, multi_processing, "
            "one worker per usable core",
            "workdir": str(workdir),
        },
        "target_ratio": TARGET_RATIO,
        "notes": [
            "ratio = pipeline images_per_s / (cpus_usable * bare_loop images_per_s)",
            "pipeline images_per_s = N / subprocess wall time, start-up included",
            f"marginal_images_per_s = (N - {OVERHEAD_IMAGES}) / (wall(N) - "
            f"wall({OVERHEAD_IMAGES} images)): start-up excluded; ratio_marginal uses it",
            "bare_loop: one process, decode -> to_model_input -> as_stored -> "
            "model(batch, training=False); warmed up on one image and one batch first",
            "bare_loop cpu_per_wall > 1: the 'one process' already used several cores",
            "peak_rss: max over samples of the summed RSS of the job's process tree "
            "(shared pages counted per process)",
            "summaries are median/min/max over rounds; each round is under 'rounds'",
        ],
        "results": results,
        "seconds_total": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: prints the report as JSON on stdout."""
    # force: importing Beam already logged through the root logger, which installed
    # a WARNING-level handler that would otherwise hide this script's progress.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    print(json.dumps(run(argv), indent=2))


if __name__ == "__main__":
    main()
