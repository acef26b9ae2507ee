"""Wall time of one preprocessing run, local runner against the Dask cluster, in alternating rounds.

The archive is the one of ``engine_wall_time.py`` (``xray-synth`` seed 0,
256-512 px, its transfer-syntax mix, cut to the first ``--images`` rows).
Each run is ``python -m beam_pipelines.preprocess`` in a subprocess, timed
whole (interpreter, imports, submission):

* ``local``: the job's default runner (FnApiRunner, multi_processing, one
  worker per usable core);
* ``dask``: the project's DaskRunner on the cluster of ``make cluster-dask``
  (``dask scheduler`` + 2 ``dask worker`` processes of 1 thread, started
  once before the clock).

The machine may be shared and noisy, so the two run side by side in
``--rounds`` rounds, alternating which goes first, and the report gives every
round, the medians and ``dask_over_local`` (median / median; the target is at
most ~1.5). Every run's output must equal the first local run's byte for
byte (``identical``) and account for every row. ``--metadata`` times another
archive instead (e.g. many small images, where per-stage overhead weighs more).

    .venv/bin/python benchmarks/dask_wall_time.py --images 2000 --rounds 2 > dask.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine_wall_time import _archive, _files  # this folder: run as a script

from engines import dask_cluster

logger = logging.getLogger(__name__)


def _run(metadata: Path, out: Path, runner: list[str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "beam_pipelines.preprocess", "--metadata", str(metadata)]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, "--output_dir", str(out), *runner], capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"preprocessing failed: {done.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest["kept"] + manifest["rejected"] != manifest["input_rows"]:
        raise RuntimeError(f"rows unaccounted for in {out}")
    return {"wall_seconds": round(seconds, 1), "input_rows": manifest["input_rows"]}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Times both runners; returns the JSON-ready report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", help="archive and outputs (default: a temp folder)")
    parser.add_argument("--metadata", type=Path, help="time this archive instead (--images unused)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dask_wall_time-")).resolve()
    metadata = args.metadata.resolve() if args.metadata else _archive(workdir, args.images)
    rounds: list[dict[str, Any]] = []
    reference: dict[str, bytes] | None = None
    with dask_cluster.running(workdir / "cluster") as cluster:
        runners = {"local": [], "dask": cluster.runner_args()}
        for index in range(args.rounds):
            order = ["local", "dask"] if index % 2 == 0 else ["dask", "local"]
            measured: dict[str, Any] = {"order": order}
            for name in order:
                out = workdir / "out" / f"{name}-{index}"
                logger.info("round %d: %s", index, name)
                measured[name] = _run(metadata, out, runners[name])
                files = _files(out)
                reference = reference if reference is not None else files
                measured[name]["identical"] = files == reference
            rounds.append(measured)
    medians = {
        name: round(statistics.median(r[name]["wall_seconds"] for r in rounds), 1)
        for name in ("local", "dask")
    }
    return {
        "machine": {"cpus_usable": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg()},
        "settings": {
            "images": rounds[0]["local"]["input_rows"],
            "rounds": args.rounds,
            "archive": str(metadata),
        },
        "rounds": rounds,
        "median_wall_seconds": medians,
        "dask_over_local": round(medians["dask"] / medians["local"], 2),
        "identical": all(r[name]["identical"] for r in rounds for name in ("local", "dask")),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: prints the report as JSON on stdout."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    print(json.dumps(run(argv), indent=2))


if __name__ == "__main__":
    main()
