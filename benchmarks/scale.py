"""Scale check: preprocessing ~7k and ~70k rows in flat memory on one machine, nothing lost.

For each archive size (``--patients``; ~2.6 images per patient, so the
default 2,600 and 26,000 patients give ~7,000 and ~70,000 rows):

1. ``xray-synth`` writes the archive (tiny 32-48 px images, its default mix
   of 7 transfer syntaxes, ``--broken`` broken rows of every kind) once; it
   is cached under ``--workdir``.
2. ``python -m beam_pipelines.preprocess`` runs on it with the default
   local runner (FnApiRunner, multi_processing, all cores), once per
   ``--blocks`` mode, side by side: ``on`` (the local default: rows planned
   on the driver, decoded in blocks) and ``off`` (the one Beam graph, as on
   a cluster). Each run is a subprocess whose whole process tree is sampled
   for RSS (the sum over processes: shared pages counted per process, an
   upper bound).
3. The outputs are reconciled independently of the job's own manifest:
   every record in the shards and every line in rejects.jsonl is counted,
   rows must equal kept + rejected, no row may appear twice, and every
   broken row xray-synth planted must be rejected with its expected reason.
   The modes' outputs must be byte-identical.

``peak_rss_ratio`` (per mode) = peak of the largest archive / peak of the
smallest: memory is flat when it stays near 1 while the archive grows 10x.

Run from the repository root::

    .venv/bin/python benchmarks/scale.py --workdir /tmp/scale
    .venv/bin/python benchmarks/scale.py --patients 50,500 --broken 16  # quick

The result is one JSON document on stdout; progress is logged to stderr.
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import importlib.util
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from archive_tools import synth
from beam_pipelines.contracts import records
from beam_pipelines.storage import tfrecord

logger = logging.getLogger(__name__)


def _sibling(name: str) -> ModuleType:
    """Loads ``benchmarks/<name>.py`` (a script folder, not a package) once."""
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


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--patients",
        default="2600,26000",
        help="comma-separated archive sizes in patients (~2.6 rows each)",
    )
    parser.add_argument(
        "--blocks",
        default="on,off",
        help="comma-separated xray-preprocess --blocks modes, run side by side (default on,off)",
    )
    parser.add_argument("--broken", type=int, default=80, help="broken rows per archive")
    parser.add_argument("--size", default="32-48", help="image side range MIN-MAX in pixels")
    parser.add_argument("--seed", type=int, default=0, help="xray-synth seed")
    parser.add_argument(
        "--workdir", default=None, help="archive cache and outputs (default: <tmp>/xray_scale)"
    )
    parser.add_argument(
        "--sample_interval", type=float, default=0.5, help="RSS sampling period in seconds"
    )
    args = parser.parse_args(argv)
    try:
        args.patients = [int(p) for p in args.patients.split(",")]
        low, high = (int(v) for v in args.size.split("-"))
    except ValueError:
        parser.error("--patients takes integers, --size MIN-MAX")
    if min(args.patients) < 1 or not 32 <= low <= high:
        parser.error("--patients must be >= 1 and --size within 32..4096")
    args.size = (low, high)
    args.blocks = args.blocks.split(",")
    if not set(args.blocks) <= {"on", "off"}:
        parser.error("--blocks takes on and/or off")
    return args


def ensure_archive(workdir: Path, patients: int, broken: int, size: tuple[int, int], seed: int):
    """The cached xray-synth archive for these parameters (written on first use)."""
    root = workdir / f"synth_p{patients}_b{broken}_{size[0]}-{size[1]}_s{seed}"
    marker = root / "scale.json"
    if marker.exists():
        return root, json.loads(marker.read_text())
    start = time.perf_counter()
    logger.info("writing %d patients with xray-synth into %s", patients, root)
    synth.run(
        [
            "--output_dir",
            str(root),
            "--patients",
            str(patients),
            "--broken",
            str(broken),
            "--min_size",
            str(size[0]),
            "--max_size",
            str(size[1]),
            "--seed",
            str(seed),
            "--overwrite",
        ]
    )
    with (root / "metadata.csv").open(newline="") as handle:
        rows = sum(1 for _ in csv.DictReader(handle))
    description = {"rows": rows, "seconds_to_generate": round(time.perf_counter() - start, 1)}
    marker.write_text(json.dumps(description))
    return root, description


def reconcile(archive: Path, output: Path) -> dict[str, Any]:
    """Counts the outputs independently of manifest.json and checks nothing is lost."""
    first_row: dict[str, int] = {}  # DicomPath -> the row a kept record stands for
    with (archive / "metadata.csv").open(newline="") as handle:
        rows = 0
        for rows, cells in enumerate(csv.DictReader(handle), start=1):  # noqa: B007
            first_row.setdefault(cells["DicomPath"], rows)
    kept_rows: list[int] = []
    for shard in sorted(output.glob("*/part-*.tfrecord.gz")):
        for serialized in tfrecord.read_tfrecord_gz(str(shard)):
            kept_rows.append(first_row[records.parse_example(serialized)["dicom_path"]])
    rejects: dict[int, str] = {}
    duplicate_rejects = 0
    for path in sorted((output / "rejects").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            duplicate_rejects += record["row"] in rejects
            rejects[record["row"]] = record["reason"]
    with (archive / "expected_rejects.csv").open(newline="") as handle:
        expected = {int(r["row"]): r["reason"] for r in csv.DictReader(handle)}
    wrong = {row: (reason, rejects.get(row)) for row, reason in expected.items()}
    wrong = {row: pair for row, pair in wrong.items() if pair[0] != pair[1]}
    manifest = json.loads((output / "manifest.json").read_text())
    kept_twice = len(kept_rows) - len(set(kept_rows))
    both = len(set(kept_rows) & set(rejects))
    return {
        "rows": rows,
        "kept_records": len(kept_rows),
        "reject_lines": len(rejects) + duplicate_rejects,
        "rows_kept_twice": kept_twice,
        "rows_rejected_twice": duplicate_rejects,
        "rows_both_kept_and_rejected": both,
        "planted_rejects": len(expected),
        "planted_rejects_wrong": len(wrong),
        "rejects_by_reason": dict(collections.Counter(rejects.values())),
        "manifest_agrees": manifest["input_rows"] == rows
        and manifest["kept"] == len(kept_rows)
        and manifest["rejected"] == len(rejects),
        "reconciled": rows == len(kept_rows) + len(rejects)
        and kept_twice == duplicate_rejects == both == 0
        and not wrong,
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes (or reuses) the archives, preprocesses each and returns the report."""
    args = _parse_args(argv)
    workdir = Path(args.workdir or Path(tempfile.gettempdir(), "xray_scale"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for patients in args.patients:
        archive, description = ensure_archive(workdir, patients, args.broken, args.size, args.seed)
        runs = {}
        for mode in args.blocks:
            output = workdir / "runs" / f"{archive.name}_blocks-{mode}"
            output.parent.mkdir(parents=True, exist_ok=True)
            logger.info("preprocessing %d rows with --blocks %s", description["rows"], mode)
            job = _throughput.run_pipeline(
                str(archive / "metadata.csv"),
                output,
                output.with_suffix(".log"),
                args.sample_interval,
                ["--blocks", mode],
            )
            logger.info(
                "%d rows in %.0f s, peak %.0f MiB",
                description["rows"],
                job["seconds"],
                job["peak_rss_mib"],
            )
            runs[mode] = {
                "job": job,
                "rows_per_s": round(description["rows"] / job["seconds"], 1),
                "reconciliation": reconcile(archive, output),
                "output": output,
            }
        digests = {mode: _digests(run.pop("output")) for mode, run in runs.items()}
        results.append(
            {
                "patients": patients,
                "archive": description,
                "runs": runs,
                # None when one mode ran: nothing to compare.
                "outputs_identical": (
                    len({json.dumps(d) for d in digests.values()}) == 1
                    if len(digests) > 1
                    else None
                ),
            }
        )
    peaks = {
        mode: [r["runs"][mode]["job"]["peak_rss_bytes"] for r in results] for mode in args.blocks
    }
    return {
        "machine": _throughput._machine(),
        "settings": {
            "patients": args.patients,
            "broken": args.broken,
            "size": list(args.size),
            "seed": args.seed,
            "blocks": args.blocks,
            "runner": "beam_pipelines.preprocess default (FnApiRunner, multi_processing)",
            "workdir": str(workdir),
        },
        "results": results,
        "peak_rss_mib": {m: [round(p / 2**20, 1) for p in ps] for m, ps in peaks.items()},
        "peak_rss_ratio": {m: round(max(ps) / min(ps), 3) for m, ps in peaks.items()},
        "all_reconciled": all(
            run["reconciliation"]["reconciled"] for r in results for run in r["runs"].values()
        ),
        "all_identical": all(r["outputs_identical"] is not False for r in results),
    }


def _digests(output: Path) -> dict[str, str]:
    """SHA-256 of every output file (the job's log is beside the output), by relative path."""
    return {
        str(path.relative_to(output)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(output.rglob("*"))
        if path.is_file()
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: prints the report as JSON on stdout."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    print(json.dumps(run(argv), indent=2))


if __name__ == "__main__":
    main()
