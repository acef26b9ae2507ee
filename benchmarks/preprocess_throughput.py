"""Preprocessing throughput: the Beam job on all cores against a bare Python loop.

What it measures, per transfer syntax (``explicit_le`` and ``j2k`` by
default), on an archive of synthetic radiographs written for the benchmark
(:func:`archive_tools.phantom.chest_phantom` stored as 12-bit MONOCHROME2,
no rescale or window, one image per patient, sides drawn from ``--size``,
2000-2500 pixels by default; ``xray-synth`` is not used because it mixes
8-16-bit formats and encodings):

* ``bare_loop``: in this process, one image after another,
  :func:`beam_pipelines.dicom.decode_model_input` (what the job calls) ->
  :func:`beam_pipelines.contracts.records.serialize`, all records written to one gzip
  TFRecord with :func:`beam_pipelines.storage.tfrecord.write_tfrecord_gz`. One image
  is decoded first, untimed, so imports and codec plugins are warm.
* ``pipeline``: ``python -m beam_pipelines.preprocess --metadata ... --output_dir
  ...`` in a subprocess with the job's default runner (the local FnApiRunner,
  which is what Beam's DirectRunner runs batch jobs on, in multi_processing
  mode with one worker per core). Its wall time includes the fixed start-up
  (interpreter, TensorFlow and Beam imports, worker processes), so the job is
  also run on a 2-image archive and ``marginal_images_per_s`` =
  (N - 2) / (wall_N - wall_2) estimates the rate without that overhead.
  Peak memory is the largest sum of RSS over the subprocess and all its
  descendants, sampled every ``--sample_interval`` seconds (shared pages are
  counted once per process, so it is an upper bound).
* ``ratio`` = pipeline images/s / (usable cores x bare-loop images/s); the
  target is ratio >= 0.85. ``ratio_marginal`` uses the marginal rate.
* ``other_cpu_seconds``: CPU time the whole machine spent outside the timed
  process tree during a run (other users of a shared machine): when it is
  large, the ratio measured the neighbours, not the job. ``steal_seconds``
  is the part of it a hypervisor gave to other virtual machines (seen here
  on a shared VM: up to 40 CPU-s during one 150 s bare loop).
* ``decode``: encodings with a reduced-resolution path (JPEG 2000, 8-bit
  JPEG) are measured twice, ``fast`` (the default) and ``full``
  (``--full_resolution_decode``, every pixel decoded), bare loop and job
  alike; ``speedup_vs_full`` compares the two job runs.

The memory check runs the job on archives of ``--memory_images`` and
``--memory_scale`` times as many small images (``--memory_size``,
explicit VR little endian) and reports both peaks and their ratio: "flat"
means a ratio close to 1.

``--repeat K`` lists every archive image K times as distinct patients
(hard-linked copies of ``raw/``), for runs long enough that start-up no longer
matters without generating K times as many images; the files then come
from the page cache, as they do for the bare loop.

Archives are cached under ``--workdir`` (keyed by their parameters), so a
rerun only times. Generating a 2000 x 2500 image takes about 0.6 s (2 s for
JPEG 2000) per core. The machine may be shared and noisy; each encoding's
measurements run back to back: bare loop, pipeline, 2-image pipeline.
``--rounds R`` repeats them R times, alternating whether the bare loop or the
pipeline goes first, and reports every round plus the median (on a shared VM
the bare loop alone moved between 97 and 126 images/s from one run to the
next).

Run from the repository root::

    .venv/bin/python benchmarks/preprocess_throughput.py
    .venv/bin/python benchmarks/preprocess_throughput.py --images 20 --skip_memory

The result is one JSON document on stdout; progress is logged to stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from archive_tools.dicom_writer import (
    EIGHT_BIT_ONLY,
    ENCODINGS,
    PixelFormat,
    RadiographHeader,
    to_stored,
    write_dicom,
)
from archive_tools.phantom import chest_phantom
from beam_pipelines import dicom, malloc_tuning
from beam_pipelines.contracts import records
from beam_pipelines.contracts.metadata import (
    ABNORMAL,
    AGE,
    COLUMNS,
    DICOM_PATH,
    PATIENT_ID,
    SEX,
    STUDY_ID,
    VIEW_POSITION,
    format_label,
)
from beam_pipelines.storage import tfrecord
from beam_pipelines.transforms.decode import make_record
from beam_pipelines.transforms.rows import ValidRow, validate_row

logger = logging.getLogger(__name__)

DEFAULT_ENCODINGS = ("explicit_le", "j2k")
TARGET_RATIO = 0.85
#: Images in the archive that estimates the pipeline's fixed overhead.
OVERHEAD_IMAGES = 2
BITS_STORED = 12
#: Bump when the generated archive changes, so cached archives are rebuilt.
_ARCHIVE_VERSION = 1
_ARCHIVE_MARKER = "archive.json"


def _size_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX pixels, got {text!r}") from None
    if not 16 <= bounds[0] <= bounds[1] <= 4096:
        raise argparse.ArgumentTypeError(f"sizes must satisfy 16 <= MIN <= MAX <= 4096: {text!r}")
    return bounds


def add_archive_arguments(parser: argparse.ArgumentParser, workdir_help: str) -> None:
    """Flags shared with the scoring benchmark: archive, encodings, sampling."""
    parser.add_argument("--images", type=int, default=60, help="images per encoding archive")
    parser.add_argument(
        "--size",
        type=_size_range,
        default=(2000, 2500),
        metavar="MIN-MAX",
        help="image side range in pixels (default 2000-2500)",
    )
    parser.add_argument(
        "--encodings",
        default=",".join(DEFAULT_ENCODINGS),
        help=f"comma-separated names from {', '.join(ENCODINGS)}",
    )
    parser.add_argument("--workdir", default=None, help=workdir_help)
    parser.add_argument(
        "--skip_overhead",
        action="store_true",
        help=f"skip the {OVERHEAD_IMAGES}-image runs (no marginal rate)",
    )
    parser.add_argument(
        "--sample_interval", type=float, default=0.2, help="RSS sampling period in seconds"
    )
    parser.add_argument("--seed", type=int, default=0, help="phantom random seed")
    parser.add_argument(
        "--skip_full_decode",
        action="store_true",
        help="measure J2K/JPEG only with reduced-resolution decoding (the default path)",
    )


def check_archive_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validates the shared flags (and splits --encodings into a list)."""
    args.encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    unknown = [e for e in args.encodings if e not in ENCODINGS]
    if unknown or not args.encodings:
        parser.error(f"unknown encodings {unknown}; known: {', '.join(ENCODINGS)}")
    if args.images <= OVERHEAD_IMAGES:
        parser.error(f"--images must be more than {OVERHEAD_IMAGES}")
    if args.sample_interval <= 0:
        parser.error("--sample_interval must be positive")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_archive_arguments(
        parser, "cache of archives and outputs (default: <tmp>/preprocess_throughput)"
    )
    parser.add_argument(
        "--memory_images", type=int, default=200, help="base archive size of the memory check"
    )
    parser.add_argument(
        "--memory_scale", type=int, default=10, help="the large archive is this many times bigger"
    )
    parser.add_argument(
        "--memory_size",
        type=_size_range,
        default=(256, 512),
        metavar="MIN-MAX",
        help="image side range of the memory check (default 256-512)",
    )
    parser.add_argument("--skip_memory", action="store_true", help="skip the memory check")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="list every archive image this many times, as distinct patients (hard-linked "
        "copies of raw/): long runs without generating more images",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure bare loop and job this many times, alternating which goes first; "
        "the report's headline is the round with the median ratio (the lower middle one "
        "for an even count)",
    )
    args = parser.parse_args(argv)
    check_archive_arguments(parser, args)
    if args.repeat < 1 or args.rounds < 1:
        parser.error("--repeat and --rounds must be positive")
    if args.memory_images < 1 or args.memory_scale < 1:
        parser.error("--memory_images and --memory_scale must be positive")
    return args


def _cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


def _machine() -> dict[str, Any]:
    import apache_beam
    import pydicom

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": _cores(),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pydicom": pydicom.__version__,
        "apache_beam": apache_beam.__version__,
    }


# --------------------------------------------------------------------------
# Archives


def _pixel_format(encoding: str) -> PixelFormat:
    # JPEG baseline cannot carry 12 bits; everything else is stored at 12.
    return PixelFormat(bits_stored=8 if encoding in EIGHT_BIT_ONLY else BITS_STORED)


def _write_image(task: tuple[str, str, int, int, int, int]) -> dict[str, str]:
    """Writes image ``index`` of an archive (runs in a worker); returns its CSV row."""
    root, encoding, index, low, high, seed = task
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(index,)))
    rows, cols = (int(v) for v in rng.integers(low, high + 1, size=2))
    abnormal = bool(rng.random() < 0.35)
    display = chest_phantom(rng, rows, cols, abnormal=abnormal)
    patient_id = f"P{index + 1:06d}"
    rel = f"raw/{patient_id}/S0001_1.dcm"
    header = RadiographHeader(
        patient_id=patient_id,
        study_id="S0001",
        patient_age=50,
        patient_sex="F",
        uid_seed=f"preprocess-throughput:{seed}",
    )
    fmt = _pixel_format(encoding)
    path = Path(root, rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(path, to_stored(display, fmt), fmt, encoding, header)
    return {
        PATIENT_ID: patient_id,
        STUDY_ID: "S0001",
        DICOM_PATH: rel,
        VIEW_POSITION: "PA",
        ABNORMAL: format_label(abnormal),
        AGE: "50",
        SEX: "F",
    }


def ensure_archive(
    workdir: Path, encoding: str, images: int, size: tuple[int, int], seed: int
) -> dict[str, Any]:
    """Writes (or reuses) an archive: ``raw/`` DICOMs plus ``metadata.csv``.

    Returns:
        The archive's description (``archive.json``) with its ``metadata`` path.
    """
    params = {
        "version": _ARCHIVE_VERSION,
        "encoding": encoding,
        "images": images,
        "size": list(size),
        "bits_stored": _pixel_format(encoding).bits_stored,
        "photometric": "MONOCHROME2",
        "seed": seed,
    }
    root = workdir / "archives" / f"{encoding}_{size[0]}-{size[1]}_n{images}_s{seed}"
    marker = root / _ARCHIVE_MARKER
    if marker.is_file():
        cached = json.loads(marker.read_text())
        if cached.get("params") == params:
            logger.info("reusing archive %s", root)
            return {**cached, "metadata": str(root / "metadata.csv"), "generated": False}
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    logger.info("writing %d %s images (%d-%d px) to %s", images, encoding, *size, root)
    start = time.perf_counter()
    tasks = [(str(root), encoding, i, size[0], size[1], seed) for i in range(images)]
    workers = min(_cores(), images // 4)
    if workers > 1:
        # fork (the Linux default), as xray-synth does: spawned children could not
        # import this script when a test loaded it by path.
        with multiprocessing.Pool(workers) as pool:
            rows = pool.map(_write_image, tasks, chunksize=max(1, images // (workers * 8)))
    else:
        rows = [_write_image(task) for task in tasks]
    _write_metadata(root / "metadata.csv", rows)
    description = {
        "params": params,
        "bytes": sum(p.stat().st_size for p in (root / "raw").rglob("*.dcm")),
        "seconds_to_generate": round(time.perf_counter() - start, 1),
    }
    marker.write_text(json.dumps(description, indent=2))
    logger.info("wrote %s in %.1f s", root, description["seconds_to_generate"])
    return {**description, "metadata": str(root / "metadata.csv"), "generated": True}


def repeated_metadata(archive: dict[str, Any], repeat: int) -> str:
    """A metadata.csv listing every image ``repeat`` times, as distinct patients.

    Copy k > 1 reads the same bytes through ``copies/c<k>/``, a tree of hard
    links to ``raw/`` inside the archive root: every row is a distinct file
    and patient (symlinks would be one file, rejected as duplicates) and is
    decoded in full, without k times the disk space.
    """
    if repeat == 1:
        return str(archive["metadata"])
    root = Path(archive["metadata"]).parent
    with open(archive["metadata"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    copies = []
    for k in range(2, repeat + 1):
        copy = root / "copies" / f"c{k}"
        if copy.is_symlink():  # the layout before hard links
            copy.unlink()
        for row in rows:
            source = root / row[DICOM_PATH]
            target = copy / source.relative_to(root / "raw")
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(source, target)
            copies.append(
                {
                    **row,
                    PATIENT_ID: f"{row[PATIENT_ID]}.c{k}",
                    DICOM_PATH: target.relative_to(root).as_posix(),
                }
            )
    metadata = root / f"metadata_x{repeat}.csv"
    _write_metadata(metadata, [*rows, *copies])
    return str(metadata)


def _write_metadata(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------
# Measurements


def _record(
    root: Path, row: int, cells: dict[str, str], options: dicom.DecodeOptions
) -> dict[str, Any]:
    """The record the job builds for one row: its own validation and make_record."""
    valid = validate_row(row, cells, str(root))
    if not isinstance(valid, ValidRow):
        raise RuntimeError(f"benchmark archive row {row} is invalid: {valid['reason']}")
    image, decoded = dicom.decode_model_input(valid.resolved_path, options, policy="pad")
    return make_record(valid, image, decoded)


def _steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests (0 where the OS does not report it)."""
    return float(getattr(psutil.cpu_times(), "steal", 0.0))


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all cores)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def bare_loop(
    metadata: str, output: Path, options: dicom.DecodeOptions = dicom.DEFAULT_OPTIONS
) -> dict[str, Any]:
    """Decode, resize and serialize every row in this process, into one TFRecord file."""
    root = Path(metadata).parent
    with open(metadata, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # The job's decode stage tunes malloc in its setup(); the loop does too,
    # so the ratio measures Beam, not the allocator.
    malloc_tuning.keep_freed_buffers()
    # Warm-up, untimed: TensorFlow's protos, codec plugins, Beam's FileSystems.
    records.serialize(_record(root, 1, rows[0], options))
    tfrecord.write_tfrecord_gz(str(output), [])

    def serialized() -> Any:
        for row, cells in enumerate(rows, start=1):
            yield records.serialize(_record(root, row, cells, options))

    process = psutil.Process()
    cpu_before = sum(process.cpu_times()[:2])
    busy_before, steal_before = _busy_cpu_seconds(), _steal_seconds()
    start = time.perf_counter()
    written = tfrecord.write_tfrecord_gz(str(output), serialized())
    seconds = time.perf_counter() - start
    cpu = sum(process.cpu_times()[:2]) - cpu_before
    others = _busy_cpu_seconds() - busy_before - cpu
    steal = _steal_seconds() - steal_before
    return {
        "images": written,
        "seconds": round(seconds, 3),
        "images_per_s": round(written / seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "cpu_per_wall": round(cpu / seconds, 3),
        "other_cpu_seconds": round(max(0.0, others), 3),
        "steal_seconds": round(steal, 3),
    }


class _TreeSampler(threading.Thread):
    """Samples a process tree: peak summed RSS, peak process count, CPU time."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self._root = psutil.Process(pid)
        self._interval = interval
        self._stop_event = threading.Event()
        self.peak_rss = 0
        self.peak_processes = 0
        self.samples = 0
        self._cpu: dict[int, float] = {}
        self._peaks: dict[int, int] = {}

    def _sample(self) -> None:
        try:
            processes = [self._root, *self._root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss, alive = 0, 0
        for process in processes:
            try:
                one = process.memory_info().rss
                rss += one
                self._peaks[process.pid] = max(self._peaks.get(process.pid, 0), one)
                self._cpu[process.pid] = sum(process.cpu_times()[:2])
                alive += 1
            except psutil.NoSuchProcess:
                continue
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_processes = max(self.peak_processes, alive)
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._sample()
            self._stop_event.wait(self._interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    @property
    def process_peaks_mib(self) -> list[float]:
        """Each process's own peak RSS, the job's process first, then largest first."""
        root = self._peaks.get(self._root.pid, 0)
        others = sorted(
            (p for pid, p in self._peaks.items() if pid != self._root.pid), reverse=True
        )
        return [round(p / 2**20, 1) for p in (root, *others)]

    @property
    def cpu_seconds(self) -> float:
        """CPU time of the tree as last seen (processes that exit early are undercounted)."""
        return sum(self._cpu.values())


def run_pipeline(
    metadata: str,
    output_dir: Path,
    log_path: Path,
    interval: float,
    extra_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Runs the preprocessing job in a subprocess; wall time and peak RSS of its tree."""
    if output_dir.exists():
        shutil.rmtree(output_dir)
    command = [
        sys.executable,
        "-m",
        "beam_pipelines.preprocess",
        "--metadata",
        metadata,
        "--output_dir",
        str(output_dir),
        *extra_args,
    ]
    with log_path.open("w") as log:
        busy_before, steal_before = _busy_cpu_seconds(), _steal_seconds()
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        sampler = _TreeSampler(child.pid, interval)
        sampler.start()
        code = child.wait()
        seconds = time.perf_counter() - start
        sampler.stop()
        others = _busy_cpu_seconds() - busy_before - sampler.cpu_seconds
        steal = _steal_seconds() - steal_before
    if code != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"preprocess exited with {code}; log {log_path}:\n{tail}")
    manifest = json.loads((output_dir / "manifest.json").read_text())
    return {
        "images": manifest["kept"],
        "rejected": manifest["rejected"],
        "seconds": round(seconds, 3),
        "images_per_s": round(manifest["kept"] / seconds, 3),
        "peak_rss_bytes": sampler.peak_rss,
        "peak_rss_mib": round(sampler.peak_rss / 2**20, 1),
        "peak_processes": sampler.peak_processes,
        "process_peaks_mib": sampler.process_peaks_mib,
        "cpu_seconds_seen": round(sampler.cpu_seconds, 3),
        "other_cpu_seconds": round(max(0.0, others), 3),
        "steal_seconds": round(steal, 3),
        "rss_samples": sampler.samples,
        "log": str(log_path),
    }


#: Encodings with a reduced-resolution decode path, measured fast and full.
REDUCIBLE = frozenset({"j2k", "jpeg_baseline"})


def _round(
    args: argparse.Namespace,
    metadata: str,
    images: int,
    tiny_metadata: str | None,
    runs: Path,
    options: dicom.DecodeOptions,
    flags: list[str],
    label: str,
    bare_first: bool,
) -> dict[str, Any]:
    """One bare-loop run and one job run (then the 2-image job run), in the given order."""
    result: dict[str, Any] = {}

    def measure_bare() -> None:
        logger.info("%s: bare loop over %d images", label, images)
        result["bare_loop"] = bare_loop(metadata, runs / "bare.tfrecord.gz", options)
        logger.info("%s: bare loop %.2f images/s", label, result["bare_loop"]["images_per_s"])

    def measure_pipeline() -> None:
        logger.info("%s: pipeline over %d images", label, images)
        result["pipeline"] = run_pipeline(
            metadata, runs / "pipeline", runs / "pipeline.log", args.sample_interval, flags
        )
        logger.info("%s: pipeline %.2f images/s", label, result["pipeline"]["images_per_s"])

    order = (measure_bare, measure_pipeline)
    for measure in order if bare_first else order[::-1]:
        measure()
    overhead, marginal = None, None
    if tiny_metadata is not None:
        overhead = run_pipeline(
            tiny_metadata, runs / "overhead", runs / "overhead.log", args.sample_interval, flags
        )
        logger.info("%s: %d-image pipeline %.1f s", label, OVERHEAD_IMAGES, overhead["seconds"])
        extra_seconds = result["pipeline"]["seconds"] - overhead["seconds"]
        if extra_seconds > 0:
            marginal = (images - OVERHEAD_IMAGES) / extra_seconds
    ideal = _cores() * result["bare_loop"]["images_per_s"]
    ratio = result["pipeline"]["images_per_s"] / ideal
    return {
        **result,
        "pipeline_overhead_run": overhead,
        "marginal_images_per_s": round(marginal, 3) if marginal is not None else None,
        "ideal_images_per_s": round(ideal, 3),
        "ratio": round(ratio, 3),
        "ratio_marginal": round(marginal / ideal, 3) if marginal is not None else None,
    }


def _round_summary(measured: dict[str, Any]) -> dict[str, Any]:
    return {
        "bare_images_per_s": measured["bare_loop"]["images_per_s"],
        "pipeline_images_per_s": measured["pipeline"]["images_per_s"],
        "marginal_images_per_s": measured["marginal_images_per_s"],
        "ratio": measured["ratio"],
        "ratio_marginal": measured["ratio_marginal"],
        "other_cpu_seconds": round(
            measured["bare_loop"]["other_cpu_seconds"] + measured["pipeline"]["other_cpu_seconds"],
            3,
        ),
    }


def _throughput(
    args: argparse.Namespace, workdir: Path, encoding: str, decode: str = "fast"
) -> dict[str, Any]:
    archive = ensure_archive(workdir, encoding, args.images, args.size, args.seed)
    metadata = repeated_metadata(archive, args.repeat)
    images = args.images * args.repeat
    runs = workdir / "runs" / (encoding if decode == "fast" else f"{encoding}_{decode}")
    runs.mkdir(parents=True, exist_ok=True)
    options = dicom.DecodeOptions(reduced_resolution=decode == "fast")
    flags = [] if decode == "fast" else ["--full_resolution_decode"]
    tiny_metadata = None
    if not args.skip_overhead:
        tiny = ensure_archive(workdir, encoding, OVERHEAD_IMAGES, args.size, args.seed)
        tiny_metadata = tiny["metadata"]
    # Alternating which side runs first cancels a machine that slows down or
    # speeds up over minutes (shared VM); the headline is the (lower) median round.
    rounds = [
        _round(
            args,
            metadata,
            images,
            tiny_metadata,
            runs,
            options,
            flags,
            f"{encoding}/{decode} round {k + 1}/{args.rounds}",
            bare_first=k % 2 == 0,
        )
        for k in range(args.rounds)
    ]
    # The lower middle for an even count: never the flattering one.
    median = sorted(rounds, key=lambda r: r["ratio"])[(len(rounds) - 1) // 2]
    marginals = [r["ratio_marginal"] for r in rounds if r["ratio_marginal"] is not None]
    ratio_marginal = statistics.median_low(marginals) if marginals else None
    return {
        "encoding": encoding,
        "decode": decode,
        "transfer_syntax_name": ENCODINGS[encoding].name,
        "archive": {k: archive[k] for k in ("params", "bytes", "seconds_to_generate", "generated")},
        **median,
        "ratio_marginal": ratio_marginal,
        "rounds": [_round_summary(r) for r in rounds],
        "within_target": median["ratio"] >= TARGET_RATIO,
        "within_target_marginal": ratio_marginal is not None and ratio_marginal >= TARGET_RATIO,
    }


def _memory_check(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    runs = workdir / "runs" / "memory"
    runs.mkdir(parents=True, exist_ok=True)
    results = []
    for images in (args.memory_images, args.memory_images * args.memory_scale):
        archive = ensure_archive(workdir, "explicit_le", images, args.memory_size, args.seed)
        logger.info("memory check: pipeline over %d images", images)
        result = run_pipeline(
            archive["metadata"],
            runs / f"n{images}",
            runs / f"n{images}.log",
            args.sample_interval,
        )
        logger.info("memory check: %d images, peak %.0f MiB", images, result["peak_rss_mib"])
        results.append({"images": images, **result})
    small, large = results
    return {
        "encoding": "explicit_le",
        "size": list(args.memory_size),
        "scale": args.memory_scale,
        "runs": results,
        "peak_rss_ratio": round(large["peak_rss_bytes"] / small["peak_rss_bytes"], 3),
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes (or reuses) the archives, times both paths and returns the report.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The JSON-ready report: machine, settings, one result per encoding
        and the memory check (None with ``--skip_memory``).
    """
    args = _parse_args(argv)
    workdir = Path(args.workdir or Path(tempfile.gettempdir(), "preprocess_throughput"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = []
    for encoding in args.encodings:
        fast = _throughput(args, workdir, encoding)
        results.append(fast)
        if encoding in REDUCIBLE and not args.skip_full_decode:
            full = _throughput(args, workdir, encoding, decode="full")
            speedup = fast["pipeline"]["images_per_s"] / full["pipeline"]["images_per_s"]
            fast["speedup_vs_full"] = round(speedup, 3)
            results.append(full)
    memory = None if args.skip_memory else _memory_check(args, workdir)
    return {
        "machine": _machine(),
        "settings": {
            "images": args.images,
            "repeat": args.repeat,
            "rounds": args.rounds,
            "size": list(args.size),
            "bits_stored": BITS_STORED,
            "photometric": "MONOCHROME2",
            "encodings": args.encodings,
            "runner": "beam_pipelines.preprocess default: FnApiRunner, multi_processing, "
            "direct_num_workers=0 (all cores)",
            "workdir": str(workdir),
        },
        "target_ratio": TARGET_RATIO,
        "notes": [
            "ratio = pipeline images_per_s / (cpus_usable * bare_loop images_per_s)",
            "pipeline images_per_s = N / subprocess wall time, start-up included",
            f"marginal_images_per_s = (N - {OVERHEAD_IMAGES}) / (wall(N) - "
            f"wall({OVERHEAD_IMAGES} images)): start-up excluded; ratio_marginal uses it",
            "rounds: bare loop and job measured --rounds times, alternately first; bare_loop, "
            "pipeline and ratio are the round with the median ratio, ratio_marginal is the "
            "median over rounds",
            "bare_loop: one process, warmed up on one image first, files from the page cache",
            "decode fast/full: reduced-resolution J2K/JPEG decoding on (default) or off; "
            "speedup_vs_full = fast pipeline images_per_s / full pipeline images_per_s",
            "other_cpu_seconds: busy CPU of the machine outside the timed process (tree); "
            "steal_seconds: the part of it the hypervisor gave to other virtual machines",
            "peak_rss: max over samples of the summed RSS of the job's process tree "
            "(shared pages counted per process)",
            "memory_check.peak_rss_ratio: peak of the scaled archive / peak of the base one",
        ],
        "results": results,
        "memory_check": memory,
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
