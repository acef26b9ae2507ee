"""The cost of writing DICOM Structured Reports: xray-score with and without ``--results_*``.

On one archive of ``--images`` synthetic radiographs (``explicit_le``, the
generator and cache of ``benchmarks/preprocess_throughput.py``, so a shared
``--workdir`` reuses its archives) and a tiny trained model (the cache of
``benchmarks/score_throughput.py``), every variant is a whole
``python -m beam_pipelines.score --model M --metadata CSV --output OUT/`` run in
a subprocess with the job's default runner, timed whole (start-up included):

* ``plain``: no results;
* ``files``: ``--results_dir DIR``, a fresh DIR each round;
* ``pacs``: ``--results_to URL`` to a private Orthanc with its DICOMweb plugin
  on localhost (``engines.orthanc``; it shares the cores with the job), a fresh
  server storage each round, so every report is stored (skipped, with the
  reason, where Orthanc is not installed);
* ``pacs_rerun``: the ``pacs`` command again on the same server: every report
  is already there, the cost of asking.

``--rounds`` rounds run back to back, the order reversed every other round
(``pacs_rerun`` always right after ``pacs``). Per variant: wall seconds,
images/s and peak RSS of the job's process tree (median, min, max over rounds),
``ratio_to_plain`` (median wall over ``plain``'s median wall) and
``extra_ms_per_image``; each round keeps the summary's results counts
(stored / already present / refused), the proof the work was done.

``micro``: in this process, per-report milliseconds and bytes of
``structured_report.encode(build_report(...))`` and of
``ReportBuilder(run).encoded(...)`` (what the job runs; a fresh builder per
pass, so its templates are built on its first reports, as in a worker), over
``--micro_reports`` varied sources, ``--rounds`` passes in alternating order.

Run from the repository root::

    .venv/bin/python benchmarks/results_throughput.py --images 1000 --rounds 3

The result is one JSON document on stdout; progress is logged to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import requests

from engines.orthanc import OrthancServer, orthanc_missing

logger = logging.getLogger(__name__)


def _sibling(name: str) -> ModuleType:
    """Another script of this folder (``benchmarks/`` is not a package), loaded by path.

    Registered in ``sys.modules`` so that its functions pickle by reference
    (the archive writer runs in a fork pool).
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


_score = _sibling("score_throughput")
_throughput = _sibling("preprocess_throughput")

ENCODING = "explicit_le"
VARIANTS = ("plain", "files", "pacs", "pacs_rerun")
#: Run together in this order (the rerun needs the server the first run filled).
_GROUPS = (("plain",), ("files",), ("pacs", "pacs_rerun"))
#: What each results variant's counts must show, as (summary key, expected = scored).
_EXPECTED = {"files": "stored", "pacs": "stored", "pacs_rerun": "already_present"}
#: Digital X-Ray Image Storage - For Presentation.
_DX = "1.2.840.10008.5.1.4.1.1.1.1"
_UID_ROOT = "1.2.826.0.1.3680043.8.498"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=1000, help="images in the archive")
    parser.add_argument(
        "--size",
        type=_throughput._size_range,
        default=(2000, 2500),
        metavar="MIN-MAX",
        help="image side range in pixels (default 2000-2500)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant")
    parser.add_argument(
        "--micro_reports", type=int, default=300, help="reports per in-process micro pass"
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="cache of archive, model and runs (<tmp>/results_throughput)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="an exported model folder (RESULTS/model); default: train a tiny simple_cnn",
    )
    parser.add_argument("--seed", type=int, default=0, help="phantom and model seed")
    parser.add_argument(
        "--sample_interval", type=float, default=0.2, help="RSS sampling period in seconds"
    )
    args = parser.parse_args(argv)
    if args.images < 1 or args.rounds < 1 or args.micro_reports < 1:
        parser.error("--images, --rounds and --micro_reports must be positive")
    if args.sample_interval <= 0:
        parser.error("--sample_interval must be positive")
    if args.model and not Path(args.model, "model.keras").is_file():
        parser.error(f"--model {args.model} has no model.keras")
    return args


# --------------------------------------------------------------------------
# The job


def run_job(
    metadata: str, model_dir: str, out: Path, extra: Sequence[str], interval: float
) -> dict[str, Any]:
    """One ``xray-score`` subprocess into the folder ``out``: wall time, peak RSS, counts."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    command = [sys.executable, "-m", "beam_pipelines.score", "--model", model_dir]
    command += ["--metadata", metadata, "--output", f"{out}/", *extra]
    with log_path.open("w") as log:
        busy_before = _throughput._busy_cpu_seconds()
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        sampler = _throughput._TreeSampler(child.pid, interval)
        sampler.start()
        code = child.wait()
        seconds = time.perf_counter() - start
        sampler.stop()
        others = _throughput._busy_cpu_seconds() - busy_before - sampler.cpu_seconds
    if code != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"xray-score exited with {code}; log {log_path}:\n{tail}")
    summary = json.loads((out / "summary.json").read_text())
    results = summary.get("results")
    keys = ("stored", "already_present", "refused", "refused_by_reason")
    return {
        "images": summary["scored"],
        "rejected": summary["rejected"],
        "seconds": round(seconds, 3),
        "images_per_s": round(summary["scored"] / seconds, 3),
        "peak_rss_mib": round(sampler.peak_rss / 2**20, 1),
        "peak_processes": sampler.peak_processes,
        "cpu_seconds_seen": round(sampler.cpu_seconds, 1),
        "other_cpu_seconds": round(max(0.0, others), 1),
        "results": None if results is None else {k: results[k] for k in keys},
        "log": str(log_path),
    }


def _orthanc_version(server: OrthancServer) -> str:
    return str(requests.get(f"{server.url}/system", timeout=10).json().get("Version"))


def _round(
    args: argparse.Namespace, index: int, model_dir: str, metadata: str, runs: Path, pacs: bool
) -> dict[str, Any]:
    """Every variant once; odd rounds in reverse group order."""
    groups = [g for g in _GROUPS if pacs or g[0] != "pacs"]
    if index % 2:
        groups.reverse()
    measured: dict[str, Any] = {"order": [v for g in groups for v in g]}

    def job(variant: str, extra: list[str]) -> None:
        label = f"round {index + 1}/{args.rounds} {variant}"
        logger.info("%s: scoring %d images", label, args.images)
        result = run_job(metadata, model_dir, runs / variant, extra, args.sample_interval)
        logger.info("%s: %.1f s, %.2f images/s", label, result["seconds"], result["images_per_s"])
        measured[variant] = result

    for group in groups:
        if group == ("plain",):
            job("plain", [])
        elif group == ("files",):
            reports = runs / "files_reports"
            shutil.rmtree(reports, ignore_errors=True)
            job("files", ["--results_dir", str(reports)])
            measured["files"]["report_files"] = sum(1 for _ in reports.rglob("*.dcm"))
        else:
            folder = runs / "orthanc"
            shutil.rmtree(folder, ignore_errors=True)  # a fresh storage: every report is new
            server = OrthancServer(folder)
            server.start()
            try:
                measured["orthanc_version"] = _orthanc_version(server)
                for variant in group:
                    job(variant, ["--results_to", server.dicomweb_url])
            finally:
                server.stop(graceful=False)  # the storage is thrown away next round
    return measured


def _spread(values: list[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "n": len(values),
    }


def _variants(rounds: list[dict[str, Any]], images: int, skipped: str | None) -> dict[str, Any]:
    """Per variant: spreads over rounds, the ratio to plain, whether the counts add up."""
    plain = statistics.median(r["plain"]["seconds"] for r in rounds)
    report: dict[str, Any] = {}
    for variant in VARIANTS:
        done = [r[variant] for r in rounds if variant in r]
        if not done:
            report[variant] = {"skipped": skipped}
            continue
        seconds = statistics.median(d["seconds"] for d in done)
        expected = _EXPECTED.get(variant)
        report[variant] = {
            "wall_seconds": _spread([d["seconds"] for d in done]),
            "images_per_s": _spread([d["images_per_s"] for d in done]),
            "peak_rss_mib": _spread([d["peak_rss_mib"] for d in done]),
            # On a shared machine the job's own CPU time moves less than its wall time.
            "cpu_seconds_seen": _spread([d["cpu_seconds_seen"] for d in done]),
            "other_cpu_seconds": _spread([d["other_cpu_seconds"] for d in done]),
            "ratio_to_plain": round(seconds / plain, 3),
            # Paired within a round: less exposed to a machine that speeds up or slows down.
            "ratio_to_plain_by_round": [
                round(r[variant]["seconds"] / r["plain"]["seconds"], 3)
                for r in rounds
                if variant in r
            ],
            "extra_ms_per_image": round(1000 * (seconds - plain) / images, 2),
            "counts_ok": all(
                d["images"] == images
                and d.get("report_files", images) == images
                and (
                    d["results"] is None
                    if expected is None
                    else d["results"][expected] == images and d["results"]["refused"] == 0
                )
                for d in done
            ),
        }
    return report


# --------------------------------------------------------------------------
# In process: one report at a time


def micro_source(index: int) -> dict[str, str]:
    """A varied source header: its own UIDs and patient, two images per study, every tenth
    name outside ASCII (UTF-8 reports)."""
    name = f"Müller^Zoë{index}" if index % 10 == 9 else f"Doe^Jane{index}"
    study = index // 2
    return {
        "PatientName": name,
        "PatientID": f"P{index:06d}",
        "IssuerOfPatientID": "BENCH",
        "PatientBirthDate": f"19{40 + index % 60:02d}0{1 + index % 9}15",
        "PatientSex": "MFO"[index % 3],
        "StudyInstanceUID": f"{_UID_ROOT}.1.{study + 1}",
        "StudyDate": "20240102",
        "StudyTime": "101500",
        "StudyID": f"S{study:05d}",
        "AccessionNumber": f"A{index:07d}",
        "ReferringPhysicianName": "Smith^John",
        "SeriesInstanceUID": f"{_UID_ROOT}.2.{study + 1}",
        "SOPClassUID": _DX,
        "SOPInstanceUID": f"{_UID_ROOT}.3.{index + 1}",
    }


Encoder = Callable[[Mapping[str, str], float, int], bytes]


def _timed_pass(encode: Encoder, items: list[tuple[dict[str, str], float, int]]) -> dict:
    times, sizes = [], []
    for source, score, finding in items:
        start = time.perf_counter()
        data = encode(source, score, finding)
        times.append(1000 * (time.perf_counter() - start))
        sizes.append(len(data))
    return {"ms": times, "bytes": sizes}


def micro(reports: int, passes: int, seed: int) -> dict[str, Any]:
    """Per-report milliseconds and bytes of both ways to make an SR, in this process."""
    # highdicom logs every module it copies at INFO, the source's UID in the line.
    quiet = logging.getLogger("highdicom")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return _micro(reports, passes, seed)
    finally:
        quiet.setLevel(level)


def _micro(reports: int, passes: int, seed: int) -> dict[str, Any]:
    from beam_pipelines.contracts import structured_report as sr

    run = sr.ReportRun("benchmark-model", "ab" * 32, 0.5, {"resize_policy": "pad"})
    scores = np.random.default_rng(seed).random(reports)
    items = [(micro_source(i), float(s), int(s >= 0.5)) for i, s in enumerate(scores)]

    def build_report(source: Mapping[str, str], score: float, finding: int) -> bytes:
        return sr.encode(sr.build_report(source, score, finding, run))

    # A fresh builder per pass: its templates are built on its first reports, as in a worker.
    methods: dict[str, Callable[[], Encoder]] = {
        "build_report": lambda: build_report,
        "report_builder": lambda: sr.ReportBuilder(run).encoded,
    }
    build_report(*items[0])  # warm-up, untimed: imports, highdicom's caches
    done: dict[str, list[dict]] = {name: [] for name in methods}
    for index in range(passes):
        for name in list(methods)[:: 1 if index % 2 == 0 else -1]:
            done[name].append(_timed_pass(methods[name](), items))
    report: dict[str, Any] = {"reports": reports, "passes": passes}
    for name, timed in done.items():
        every = [ms for t in timed for ms in t["ms"]]
        sizes = timed[0]["bytes"]
        report[name] = {
            "ms_per_report": _spread([statistics.fmean(t["ms"]) for t in timed]),
            "first_report_ms": _spread([t["ms"][0] for t in timed]),
            "report_ms_median": round(statistics.median(every), 3),
            "report_ms_p90": round(float(np.percentile(every, 90)), 3),
            "bytes_per_report": {
                "mean": round(statistics.fmean(sizes)),
                "min": min(sizes),
                "max": max(sizes),
            },
        }
    report["builder_speedup"] = round(
        report["build_report"]["ms_per_report"]["median"]
        / report["report_builder"]["ms_per_report"]["median"],
        2,
    )
    # Both ways make the same report (creation date and time aside): read back, a few sources.
    builder = sr.ReportBuilder(run)
    report["same_reports_read_back"] = all(
        sr.read_report(builder.encoded(*item)) == sr.read_report(build_report(*item))
        for item in items[:10]
    )
    return report


# --------------------------------------------------------------------------


def _commit() -> str | None:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent,
    )
    return done.stdout.strip() or None


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes (or reuses) the archive and the model, times every variant, returns the report."""
    args = _parse_args(argv)
    workdir = Path(args.workdir or Path(tempfile.gettempdir(), "results_throughput")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), list(os.getloadavg())
    model_dir = str(Path(args.model) if args.model else _score.ensure_model(workdir, args.seed))
    archive = _throughput.ensure_archive(workdir, ENCODING, args.images, args.size, args.seed)
    logger.info("micro: %d reports x %d passes", args.micro_reports, args.rounds)
    measured_micro = micro(args.micro_reports, args.rounds, args.seed)
    skipped = orthanc_missing()
    if skipped:
        logger.warning("pacs variants skipped: %s", skipped)
    runs = workdir / "results_runs"
    rounds = [
        _round(args, index, model_dir, archive["metadata"], runs, skipped is None)
        for index in range(args.rounds)
    ]
    return {
        "machine": {
            **_throughput._machine(),
            "load_avg_before": load_before,
            "load_avg_after": list(os.getloadavg()),
        },
        "settings": {
            "images": args.images,
            "size": list(args.size),
            "encoding": ENCODING,
            "bits_stored": _throughput.BITS_STORED,
            "rounds": args.rounds,
            "micro_reports": args.micro_reports,
            "model": model_dir,
            "trained_here": args.model is None,
            "runner": "beam_pipelines.score default: FnApiRunner, multi_processing, "
            "one worker per usable core",
            "commit": _commit(),
            "workdir": str(workdir),
        },
        "archive": {k: archive[k] for k in ("params", "bytes", "seconds_to_generate", "generated")},
        "notes": [
            "wall seconds are whole subprocess runs, start-up included",
            "ratio_to_plain = variant median wall / plain median wall; extra_ms_per_image = "
            "(variant median - plain median) / images",
            "every archive image is its own patient and study, so every report is in a "
            "series of its own (--results_batch_size reports per request all the same)",
            "Orthanc runs on this machine and shares its cores with the job",
            "peak_rss: the job's process tree only (Orthanc not included)",
            "other_cpu_seconds: CPU the machine spent outside the job's process tree during "
            "a run (Orthanc's work for pacs runs, and other users of a shared machine)",
        ],
        "variants": _variants(rounds, args.images, skipped),
        "micro": measured_micro,
        "rounds": rounds,
        "seconds_total": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: prints the report as JSON on stdout."""
    # force: Beam's import installed a WARNING-level root handler that would hide progress.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    print(json.dumps(run(argv), indent=2))


if __name__ == "__main__":
    main()
