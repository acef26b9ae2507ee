"""Wall time of one preprocessing run per engine (local, Dask, Flink, Spark) on one archive.

The archive is ``xray-synth`` (seed 0, its default 256-512 px images and
transfer-syntax mix) cut to the first ``--images`` rows of its metadata.csv.
Each engine runs ``python -m beam_pipelines.preprocess`` in a subprocess and
the wall time of that subprocess is reported (interpreter, imports and job
submission included):

* ``local``: the job's default runner (FnApiRunner, multi_processing, one
  worker per usable core).
* ``dask``: the project's DaskRunner on the cluster of ``make cluster-dask``
  (``dask scheduler`` + 2 ``dask worker`` processes, started before the
  clock); ``dask_wall_time.py`` times it against the local runner in
  alternating rounds, for the ratio.
* ``flink`` / ``spark``: the local cluster of ``make cluster-flink`` /
  ``make cluster-spark`` (started before the clock, 2 slots / 2 cores) with
  the flags it prints: Beam's job server jar and EXTERNAL workers from the
  loopback worker pool. Skipped, with the reason, where Java, the
  distribution or the job server jar is missing.

``identical`` says whether the engine's output files equal the local run's
byte for byte. Each engine is one function in ENGINES; more engines are added
the same way.

    .venv/bin/python benchmarks/engine_wall_time.py --images 2000 > engines.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engines import dask_cluster, session, tools

logger = logging.getLogger(__name__)


@contextmanager
def _local(_run_dir: Path) -> Iterator[list[str]]:
    yield []


@contextmanager
def _cluster(name: str, run_dir: Path) -> Iterator[list[str]]:
    missing = tools.missing_job_server(name)
    if missing:
        raise tools.MissingArtifact(missing)
    with session.running(name, run_dir) as engine:
        yield engine.runner_args()


@contextmanager
def _dask(run_dir: Path) -> Iterator[list[str]]:
    with dask_cluster.running(run_dir) as cluster:
        yield cluster.runner_args()


def _flink(run_dir: Path) -> Any:
    return _cluster("flink", run_dir)


def _spark(run_dir: Path) -> Any:
    return _cluster("spark", run_dir)


# name -> context manager giving the runner flags while the engine is up.
ENGINES: dict[str, Callable[[Path], Any]] = {
    "local": _local,
    "dask": _dask,
    "flink": _flink,
    "spark": _spark,
}


def _archive(workdir: Path, images: int) -> Path:
    """metadata.csv of `images` rows from a synthetic archive (written once per size)."""
    root = workdir / "archive"
    metadata = root / f"metadata_{images}.csv"
    if metadata.exists():
        return metadata
    patients = images // 2 + 10  # xray-synth writes about 2.6 images per patient
    subprocess.run(
        [sys.executable, "-m", "archive_tools.synth", "--output_dir", str(root)]
        + ["--patients", str(patients), "--seed", "0", "--overwrite"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    rows = (root / "metadata.csv").read_text().splitlines(keepends=True)
    if len(rows) - 1 < images:
        raise ValueError(f"the synthetic archive has {len(rows) - 1} rows, fewer than {images}")
    metadata.write_text("".join(rows[: images + 1]))
    return metadata


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _run_engine(name: str, metadata: Path, workdir: Path, reference: Path | None) -> dict:
    out = workdir / "out" / name
    command = [sys.executable, "-m", "beam_pipelines.preprocess", "--metadata", str(metadata)]
    command += ["--output_dir", str(out)]
    try:
        with ENGINES[name](workdir / "run" / name) as runner:
            logger.info("%s: preprocessing %s", name, metadata)
            started = time.perf_counter()
            done = subprocess.run([*command, *runner], capture_output=True, text=True)
            seconds = time.perf_counter() - started
    except tools.MissingArtifact as missing:
        return {"engine": name, "skipped": str(missing)}
    if done.returncode != 0:
        return {"engine": name, "failed": done.stderr[-2000:]}
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "engine": name,
        "wall_seconds": round(seconds, 1),
        "images_per_s": round(manifest["input_rows"] / seconds, 1),
        "kept": manifest["kept"],
        "rejected": manifest["rejected"],
        "identical": None if reference is None else _files(out) == _files(reference),
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Times each engine; returns the JSON-ready report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--engines", nargs="+", choices=sorted(ENGINES), default=list(ENGINES))
    parser.add_argument("--workdir", help="archive and outputs (default: a temp folder)")
    args = parser.parse_args(argv)
    # Absolute: cluster workers run in folders of their own.
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="engine_wall_time-")).resolve()
    metadata = _archive(workdir, args.images)
    engines = ["local"] + [e for e in args.engines if e != "local"]
    results = []
    for name in engines:
        reference = workdir / "out" / "local" if name != "local" else None
        results.append(_run_engine(name, metadata, workdir, reference))
    return {
        "machine": {"cpus_usable": len(os.sched_getaffinity(0))},
        "settings": {"images": args.images, "archive": str(metadata)},
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: prints the report as JSON on stdout."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    print(json.dumps(run(argv), indent=2))


if __name__ == "__main__":
    main()
