"""Decode-speed benchmark: our DICOM decoder against bare pydicom, per encoding.

What it measures, for one synthetic radiograph-sized chest image
(:func:`archive_tools.phantom.chest_phantom`, 2500 x 2048 by default) written
once per transfer syntax with :func:`archive_tools.dicom_writer.write_dicom`:

* ``bare_pydicom_ms``: ``pydicom.dcmread(path).pixel_array``, i.e. read and
  decode the whole file into stored values: the baseline a user would write.
* ``decode_ms``: :func:`beam_pipelines.dicom.read_image` on the same path
  (read, header checks, decode, modality LUT / VOI / bit-range normalization
  and MONOCHROME1 inversion to float32 [0, 1]).
* ``resize_ms``: :func:`beam_pipelines.dicom.to_model_input` on the decoded
  image (224 x 224 x 1, padded).
* ``model_input_ms``: :func:`beam_pipelines.dicom.decode_model_input`, what
  the jobs call: decode straight to the model input (reduced-resolution
  decoding where the codec allows, and the resize's first box average done
  while the pixels are mapped, so the full-size float image is never made).
* ``ratio``: median ``decode_ms`` / median ``bare_pydicom_ms``. The target is
  ratio <= 1.2 (normalization should cost little next to decoding).
* ``bare_same_plugin_ms`` / ``ratio_same_plugin``, when pydicom's default
  codec plugin differs from the one our decoder uses (with python-gdcm
  installed pydicom picks GDCM for JPEG 2000; we keep GDCM last because it
  aborts the whole process on malformed input): bare pydicom forced to our
  plugin. ``within_target`` judges this codec-for-codec ratio when present.
* ``model_input``, for the syntaxes with a reduced-resolution path (JPEG 2000,
  8-bit JPEG): :func:`beam_pipelines.dicom.decode_model_input` with
  ``reduced_resolution`` off (``full_ms``: decode every pixel, then resize)
  and on (``fast_ms``), timed interleaved, with ``fast_ratio`` =
  fast / full (target for JPEG 2000: <= 0.15), the level or DCT scale used
  and the fast image's correlation and mean absolute difference with the
  full one.

Lossless encodings store 12-bit MONOCHROME2; ``jpeg_baseline`` can only carry
8 bits, so it stores the same image at 8 bits (its ``bits_stored`` says so).
One extra file, ``explicit_le_mono1_window``, stores 12-bit MONOCHROME1 with a
rescale slope/intercept and a VOI window that covers the image, which runs the
whole normalization path (modality LUT, window, inversion).

Method: the process keeps freed buffers as the jobs' workers do
(:mod:`beam_pipelines.malloc_tuning`; without it, which reader paid for
page faults depended on the allocations before it: the windowed file's
decode varied 9-33 ms between rounds). Each call re-reads the file from
disk (after the first pass it comes from the OS page cache, so this times
parsing and decoding, not the disk).
Everything is warmed up once (imports, codec plugin loading) before timing.
The machine may be shared and noisy, so the measurements are interleaved
round-robin: each repeat times every file once, alternating which of the two
readers goes first; the median and the minimum of the repeats are reported.

Run from the repository root::

    .venv/bin/python benchmarks/decode_benchmark.py
    .venv/bin/python benchmarks/decode_benchmark.py --rows 512 --cols 512 --repeats 3

The result is one JSON document on stdout; progress is logged to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from archive_tools.dicom_writer import (
    ENCODINGS,
    PixelFormat,
    RadiographHeader,
    to_stored,
    write_dicom,
)
from archive_tools.phantom import chest_phantom
from beam_pipelines import dicom, malloc_tuning
from beam_pipelines.dicom import frames

logger = logging.getLogger(__name__)

DEFAULT_ENCODINGS = (
    "explicit_le",
    "big_endian",
    "deflate",
    "rle",
    "jpegls",
    "j2k",
    "jpeg_baseline",
)
#: The extra file that exercises the full normalization path.
WINDOW_VARIANT = "explicit_le_mono1_window"
TARGET_RATIO = 1.2
#: Reduced-resolution JPEG 2000 decode + resize against the full path.
TARGET_FAST_RATIO = 0.15
FULL_DECODE = dicom.DecodeOptions(reduced_resolution=False)
#: Encodings with a reduced-resolution path.
REDUCIBLE = ("j2k", "jpeg_baseline")


@dataclass(frozen=True)
class BenchFile:
    """One written test file and how it was stored."""

    name: str
    encoding: str
    path: Path
    fmt: PixelFormat


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=2500, help="image height in pixels")
    parser.add_argument("--cols", type=int, default=2048, help="image width in pixels")
    parser.add_argument(
        "--bits", type=int, default=12, help="BitsStored of the lossless files (8..16)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per file")
    parser.add_argument(
        "--encodings",
        default=",".join(DEFAULT_ENCODINGS),
        help=(
            f"comma-separated names from {', '.join(ENCODINGS)}; {WINDOW_VARIANT} is always added"
        ),
    )
    parser.add_argument(
        "--workdir", default=None, help="where to write the files (default: a temporary directory)"
    )
    parser.add_argument("--seed", type=int, default=0, help="phantom random seed")
    args = parser.parse_args(argv)
    args.encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    unknown = [e for e in args.encodings if e not in ENCODINGS and e != WINDOW_VARIANT]
    if unknown:
        parser.error(f"unknown encodings {unknown}; known: {', '.join(ENCODINGS)}")
    if WINDOW_VARIANT not in args.encodings:
        args.encodings.append(WINDOW_VARIANT)
    if args.rows < 1 or args.cols < 1 or args.repeats < 1:
        parser.error("--rows, --cols and --repeats must be positive")
    if not 8 <= args.bits <= 16:
        parser.error("--bits must be in 8..16")
    return args


def _window_format(display: np.ndarray, bits: int) -> PixelFormat:
    """MONOCHROME1 with a rescale and a window over the image's 1st-99th percentile."""
    slope, intercept = 0.5, -1024.0
    base = PixelFormat(
        bits_stored=bits,
        photometric="MONOCHROME1",
        rescale_slope=slope,
        rescale_intercept=intercept,
    )
    modality = to_stored(display, base).astype(np.float64) * slope + intercept
    lo, hi = np.percentile(modality, [1.0, 99.0])
    width = max(float(hi - lo), 2.0)
    return PixelFormat(
        bits_stored=bits,
        photometric="MONOCHROME1",
        rescale_slope=slope,
        rescale_intercept=intercept,
        window_center=float(lo + hi) / 2.0,
        window_width=width,
    )


def _write_files(
    display: np.ndarray, names: Sequence[str], bits: int, workdir: Path
) -> list[BenchFile]:
    header = RadiographHeader(patient_id="BENCH0001", study_id="BENCH", uid_seed="decode-bench")
    files = []
    for name in names:
        if name == WINDOW_VARIANT:
            encoding, fmt = "explicit_le", _window_format(display, bits)
        elif name == "jpeg_baseline":
            encoding, fmt = name, PixelFormat(bits_stored=8)
        else:
            encoding, fmt = name, PixelFormat(bits_stored=bits)
        path = workdir / f"{name}.dcm"
        write_dicom(path, to_stored(display, fmt), fmt, encoding, header)
        files.append(BenchFile(name, encoding, path, fmt))
        logger.info("wrote %s (%d bytes)", path, path.stat().st_size)
    return files


def _bare_pydicom(path: Path, plugin: str = "") -> np.ndarray:
    ds = pydicom.dcmread(path)
    if plugin:
        ds.pixel_array_options(decoding_plugin=plugin)
    return ds.pixel_array


def _plugins(encoding: str) -> tuple[str, str]:
    """(pydicom's default plugin, the one our decoder tries first) for an encoding."""
    syntax = ENCODINGS[encoding]
    if not syntax.is_encapsulated and syntax != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return "", ""
    available = pydicom.pixels.get_decoder(syntax).available_plugins
    return (available[0] if available else ""), frames.plugin_order(available, syntax)[0]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return (time.perf_counter() - start) * 1000.0, value


def _summary(samples: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(samples), 3), "min": round(min(samples), 3)}


def _machine() -> dict[str, Any]:
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity(0)) if affinity else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pydicom": pydicom.__version__,
    }


def _benchmark(files: Sequence[BenchFile], repeats: int) -> list[dict[str, Any]]:
    # As in the jobs' workers (and for both readers alike): freed image
    # buffers stay in the process, so timings do not depend on which earlier
    # allocation made glibc hand pages back to the kernel.
    malloc_tuning.keep_freed_buffers()
    # Warm-up: imports (Beam's FileSystems, Pillow), codec plugin loading, page cache.
    info = {}
    for f in files:
        bare = _bare_pydicom(f.path)
        decoded = dicom.decode(str(f.path))
        dicom.to_model_input(decoded.image)
        info[f.name] = (bare, decoded)

    plugins = {f.name: _plugins(f.encoding) for f in files}
    times: dict[str, dict[str, list[float]]] = {
        f.name: {
            key: [] for key in ("bare", "bare_same", "decode", "resize", "model", "full", "fast")
        }
        for f in files
    }
    for repeat in range(repeats):
        for f in files:
            path = f.path
            t = times[f.name]
            # Alternate who goes first so neither always gets the warmer cache.
            if repeat % 2 == 0:
                t["bare"].append(_timed(lambda p=path: _bare_pydicom(p))[0])
                ms, image = _timed(lambda p=path: dicom.read_image(str(p)))
            else:
                ms, image = _timed(lambda p=path: dicom.read_image(str(p)))
                t["bare"].append(_timed(lambda p=path: _bare_pydicom(p))[0])
            t["decode"].append(ms)
            default_plugin, our_plugin = plugins[f.name]
            if our_plugin != default_plugin:
                same = lambda p=path, q=our_plugin: _bare_pydicom(p, q)  # noqa: E731
                t["bare_same"].append(_timed(same)[0])
            t["resize"].append(_timed(lambda im=image: dicom.to_model_input(im))[0])
            t["model"].append(_timed(lambda p=path: dicom.decode_model_input(str(p)))[0])
            if f.name in REDUCIBLE:
                full = lambda p=path: dicom.decode_model_input(str(p), FULL_DECODE)  # noqa: E731
                fast = lambda p=path: dicom.decode_model_input(str(p))  # noqa: E731
                order = (("full", full), ("fast", fast))
                for key, fn in order if repeat % 2 == 0 else order[::-1]:
                    t[key].append(_timed(fn)[0])
        logger.info("repeat %d/%d done", repeat + 1, repeats)

    results = []
    for f in files:
        bare, decoded = info[f.name]
        t = times[f.name]
        bare_ms, decode_ms, resize_ms = (_summary(t[k]) for k in ("bare", "decode", "resize"))
        ratio = decode_ms["median"] / bare_ms["median"] if bare_ms["median"] > 0 else None
        ratio_min = decode_ms["min"] / bare_ms["min"] if bare_ms["min"] > 0 else None
        result: dict[str, Any] = {
            "encoding": f.name,
            "transfer_syntax": str(ENCODINGS[f.encoding]),
            "transfer_syntax_name": ENCODINGS[f.encoding].name,
            "file_bytes": f.path.stat().st_size,
            "bits_stored": f.fmt.bits_stored,
            "photometric": f.fmt.photometric,
            "rescale": f.fmt.has_rescale,
            "window": f.fmt.has_window,
            "voi_used": decoded.intensity_source,
            "inverted": decoded.inverted,
            "stored_dtype": str(bare.dtype),
            "bare_pydicom_ms": bare_ms,
            "decode_ms": decode_ms,
            "resize_ms": resize_ms,
            "model_input_ms": _summary(t["model"]),
            "ratio": round(ratio, 3) if ratio is not None else None,
            "ratio_of_mins": round(ratio_min, 3) if ratio_min is not None else None,
            "within_target": ratio is not None and ratio <= TARGET_RATIO,
            "pydicom_plugin": plugins[f.name][0],
            "our_plugin": plugins[f.name][1],
            "samples_ms": {
                k: [round(v, 3) for v in t[k]] for k in ("bare", "decode", "resize", "model")
            },
        }
        if t["bare_same"]:
            # pydicom's default here differs from ours (e.g. GDCM, which we
            # keep last: it aborts the process on malformed input).
            same_ms = _summary(t["bare_same"])
            result["bare_same_plugin_ms"] = same_ms
            same_ratio = decode_ms["median"] / same_ms["median"]
            result["ratio_same_plugin"] = round(same_ratio, 3)
            result["within_target"] = same_ratio <= TARGET_RATIO
        if f.name in REDUCIBLE:
            result["model_input"] = _model_input_report(f, t)
        if f.encoding == "jpeg_baseline":
            result["note"] = "JPEG baseline carries only 8 bits: stored at bits_stored=8"
        results.append(result)
    return results


def _model_input_report(f: BenchFile, t: dict[str, list[float]]) -> dict[str, Any]:
    """Full vs reduced-resolution decode + resize of one file, with the fidelity."""
    full_image, _ = dicom.decode_model_input(str(f.path), FULL_DECODE)
    fast_image, fast = dicom.decode_model_input(str(f.path))
    full_ms, fast_ms = _summary(t["full"]), _summary(t["fast"])
    ratio = fast_ms["median"] / full_ms["median"]
    return {
        "full_ms": full_ms,
        "fast_ms": fast_ms,
        "fast_path": fast.route,
        "reduction": fast.reduction,
        "decoded_shape": list(fast.image.shape),
        "fast_ratio": round(ratio, 3),
        "within_target": fast.route != "j2k_reduced" or ratio <= TARGET_FAST_RATIO,
        "correlation": round(float(np.corrcoef(fast_image.ravel(), full_image.ravel())[0, 1]), 5),
        "mean_abs_diff": round(float(np.abs(fast_image - full_image).mean()), 5),
        "samples_ms": {k: [round(v, 3) for v in t[k]] for k in ("full", "fast")},
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes the test files, times both readers and returns the report.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The JSON-ready report: machine, image, repeats, notes and one result
        per encoding (times in milliseconds, median and min of the repeats).
    """
    args = _parse_args(argv)
    display = chest_phantom(np.random.default_rng(args.seed), args.rows, args.cols, abnormal=False)
    with tempfile.TemporaryDirectory(prefix="decode_bench_") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        files = _write_files(display, args.encodings, args.bits, workdir)
        results = _benchmark(files, args.repeats)
    return {
        "machine": _machine(),
        "image": {"rows": args.rows, "cols": args.cols, "bits": args.bits},
        "repeats": args.repeats,
        "target_ratio": TARGET_RATIO,
        "notes": [
            "times in ms; median and min over the repeats, interleaved round-robin",
            "every call re-reads the file; after warm-up it comes from the OS page cache",
            "ratio = median decode_ms / median bare_pydicom_ms",
            "jpeg_baseline is stored at 8 bits (the syntax cannot carry 12)",
            f"{WINDOW_VARIANT}: MONOCHROME1 + rescale + VOI window, explicit VR LE",
            "model_input: decode_model_input full vs reduced resolution; "
            f"target fast_ratio <= {TARGET_FAST_RATIO} for JPEG 2000",
        ],
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: prints the report as JSON on stdout."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(json.dumps(run(argv), indent=2))


if __name__ == "__main__":
    main()
