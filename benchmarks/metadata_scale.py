"""metadata.csv at scale: rows/s and memory of reading + validating 10^5 and 10^6 rows.

What it measures, for each size in ``--rows``: a synthetic metadata.csv
(three images per patient in ``raw/P…/``, the contract columns plus one extra
column, and one broken row in every ``--bad_every`` of five kinds:
undecodable bytes, too few cells, a path leaving the root, a URI of a scheme
not allowed, a bad label) goes through the validation stage exactly as the
jobs run it on one worker: :func:`beam_pipelines.transforms.rows.read_metadata` (or, with
mode ``whole_file``, the file read whole and decoded first, the way the job
read it before streaming) and :func:`beam_pipelines.transforms.rows.validate_row`
against a local archive root, nothing kept but counters.

Each (size, mode) runs in a fresh Python process so its memory is its own:
``baseline_rss_mib`` is the peak RSS once imports are done, ``peak_rss_mib``
the peak at the end, ``growth_mib`` their difference. Streaming holds one
row at a time, so its growth stays flat while the file grows 10x; reading
whole grows with the file. The paths do not exist (validation does not open
files; its symlink check costs one ``lstat`` per row and a cached
``realpath`` per folder).

Run from the repository root::

    .venv/bin/python benchmarks/metadata_scale.py
    .venv/bin/python benchmarks/metadata_scale.py --rows 10000,100000 --modes stream

The result is one JSON document on stdout; progress is logged to stderr.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
MODES = ("stream", "whole_file")
HEADER = b"PatientID,StudyID,DicomPath,ViewPosition,Abnormal,Age,Sex,Site\n"
#: Broken rows the file carries, cycled, and the reason each must get.
BAD_KINDS = {
    "bad_encoding": b"P{p},S{p},raw/P{p}/caf\xe9.dcm,PA,true,40,F,north\n",
    "ragged_row": b"P{p},S{p},raw/P{p}/short.dcm,PA\n",
    "path_escapes_root": b"P{p},S{p},../outside/P{p}.dcm,PA,true,40,F,north\n",
    "scheme_not_allowed": b"P{p},S{p},http://example.invalid/P{p}.dcm,PA,true,40,F,north\n",
    "bad_label": b"P{p},S{p},raw/P{p}/label.dcm,PA,maybe,40,F,north\n",
}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--rows", default="100000,1000000", help="comma-separated sizes (data rows)"
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}"
    )
    parser.add_argument(
        "--bad_every", type=int, default=1000, help="one broken row per this many rows"
    )
    parser.add_argument("--workdir", help="where the CSVs go (default: a temporary folder)")
    parser.add_argument("--child", nargs=3, metavar=("CSV", "ROOT", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_metadata(path: Path, rows: int, bad_every: int) -> dict[str, int]:
    """Writes a metadata.csv of ``rows`` data rows; returns the expected rejects per reason."""
    expected: collections.Counter[str] = collections.Counter()
    kinds = list(BAD_KINDS)
    with path.open("wb") as handle:
        handle.write(HEADER)
        buffer = []
        for i in range(rows):
            patient = f"{i // 3:07d}"
            if bad_every and i % bad_every == bad_every - 1:
                kind = kinds[(i // bad_every) % len(kinds)]
                expected[kind] += 1
                buffer.append(BAD_KINDS[kind].replace(b"{p}", patient.encode()))
            else:
                label = "true" if i % 2 else "false"
                path = f"raw/P{patient}/{i % 3}.dcm"
                line = f"P{patient},S{patient},{path},PA,{label},{40 + i % 50},F,north\n"
                buffer.append(line.encode())
            if len(buffer) >= 10_000:
                handle.writelines(buffer)
                buffer.clear()
        handle.writelines(buffer)
    return dict(expected)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(csv_path: str, root: str, mode: str) -> dict[str, Any]:
    """Runs in its own process: validates every row, returns counts, time and memory."""
    from beam_pipelines.contracts.metadata import iter_metadata
    from beam_pipelines.transforms.rows import ValidRow, read_metadata, validate_row

    baseline = _peak_rss_mib()
    start = time.perf_counter()
    if mode == "stream":
        source = read_metadata(csv_path)
    else:  # the file read whole, then parsed: what the job did before streaming
        with open(csv_path, "rb") as handle:
            text = handle.read().decode("utf-8-sig", errors="surrogateescape")
        source = iter_metadata(text)
    kept = 0
    rejected: collections.Counter[str] = collections.Counter()
    rows = 0
    for row, cells in source:
        rows = row
        result = validate_row(row, cells, root)
        if isinstance(result, ValidRow):
            kept += 1
        else:
            rejected[result["reason"]] += 1
    seconds = time.perf_counter() - start
    peak = _peak_rss_mib()
    return {
        "rows": rows,
        "kept": kept,
        "rejected_by_reason": dict(sorted(rejected.items())),
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds) if seconds else None,
        "baseline_rss_mib": round(baseline, 1),
        "peak_rss_mib": round(peak, 1),
        "growth_mib": round(peak - baseline, 1),
    }


def _measure(csv_path: Path, root: Path, mode: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(csv_path), str(root), mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return json.loads(done.stdout)


def _machine() -> dict[str, Any]:
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity(0)) if affinity else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes the CSVs, measures every (size, mode) in its own process, returns the report."""
    args = _parse_args(argv)
    sizes = [int(s) for s in args.rows.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    results = []
    with tempfile.TemporaryDirectory(prefix="metadata_scale_") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        root = workdir / "archive"
        root.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            csv_path = root / f"metadata_{size}.csv"
            logger.info("writing %d rows to %s", size, csv_path)
            expected = write_metadata(csv_path, size, args.bad_every)
            for mode in modes:
                logger.info("validating %d rows (%s)", size, mode)
                result = _measure(csv_path, root, mode)
                if result["rows"] != size or result["rejected_by_reason"] != expected:
                    raise RuntimeError(f"rows lost or misjudged: {result} (expected {expected})")
                file_mib = csv_path.stat().st_size / 2**20
                results.append(
                    {"size": size, "mode": mode, "file_mib": round(file_mib, 1), **result}
                )
    growth = {}
    for mode in modes:
        mine = [r for r in results if r["mode"] == mode]
        if len(mine) >= 2:
            small, large = mine[0], mine[-1]
            growth[mode] = {
                "rows_ratio": large["size"] / small["size"],
                "peak_rss_ratio": round(large["peak_rss_mib"] / small["peak_rss_mib"], 2),
                "growth_mib": [small["growth_mib"], large["growth_mib"]],
                "rows_per_s_ratio": round(large["rows_per_s"] / small["rows_per_s"], 2),
            }
    return {
        "machine": _machine(),
        "bad_every": args.bad_every,
        "notes": [
            "one process per (size, mode); stage = read_metadata (or whole-file read) + "
            "validate_row, single thread, local archive root",
            "baseline_rss_mib: peak RSS after imports; growth_mib: peak at the end - baseline",
            "rows_per_s_ratio near 1 between sizes: linear time; growth flat: bounded memory",
        ],
        "results": results,
        "scaling": growth,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: prints the report as JSON on stdout."""
    args = _parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(json.dumps(run(argv), indent=2))


if __name__ == "__main__":
    main()
