"""Reading an archive from a PACS against reading its files: indexing and preprocessing rates.

One synthetic archive (``xray-synth`` seed 0, its default 256-512 px images
and transfer-syntax mix) is written to a folder and uploaded to a private
Orthanc with its DICOMweb plugin on localhost (``engines.orthanc``; Debian
packages ``orthanc orthanc-dicomweb``). Every job runs as
``python -m beam_pipelines.<job>`` in a subprocess with the default local
runner (one worker per core), timed whole:

* ``index``: ``xray-index`` over the folder (``--dicom_root``) and over
  DICOMweb (``--dicomweb_url``), on the whole archive and on its first
  ``--small`` files. ``instances_per_s`` is the whole run's rate;
  ``steady_instances_per_s`` takes the small run's time off (interpreter,
  imports, pipeline start: what a bigger archive does not pay again), i.e.
  (N - n) / (t_N - t_n).
* ``preprocess``: ``xray-preprocess`` of the folder index (``--archive_root``)
  and of the DICOMweb index (``--dicomweb_url``), ``--rounds`` rounds in
  alternating order; ``ratio`` = file median / DICOMweb median (the DICOMweb
  rate as a fraction of the file rate; the issue's goal is >= 0.7).
  ``identical_images`` says whether both runs stored the same image bytes.

The machine may be shared and noisy: sides alternate, and every round is in
the report with the medians.

    .venv/bin/python benchmarks/dicomweb_throughput.py --index_images 5000 > dicomweb.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from beam_pipelines.contracts import records
from beam_pipelines.storage import tfrecord
from engines.orthanc import OrthancServer, orthanc_missing

logger = logging.getLogger(__name__)

SOURCES = ("folder", "dicomweb")


def _archive(root: Path, images: int) -> list[Path]:
    """The first `images` files (metadata order) of a synthetic archive (written once per size)."""
    if not (root / "metadata.csv").exists():
        patients = images // 2 + 10  # xray-synth writes about 2.6 images per patient
        subprocess.run(
            [sys.executable, "-m", "archive_tools.synth", "--output_dir", str(root)]
            + ["--patients", str(patients), "--seed", "0", "--overwrite"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    rows = (root / "metadata.csv").read_text().splitlines()[1:]
    if len(rows) < images:
        raise ValueError(f"the synthetic archive has {len(rows)} rows, fewer than {images}")
    # DicomPath is the third column; synthetic paths hold no commas.
    return [root / row.split(",")[2] for row in rows[:images]]


def _subset(files: list[Path], root: Path, folder: Path) -> Path:
    """A folder of symlinks to `files` (their paths under `root` kept): an archive of its own."""
    if folder.exists():
        return folder
    for path in files:
        link = folder / path.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return folder


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed: {done.stderr[-2000:]}")
    return round(seconds, 2)


def _job(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"beam_pipelines.{name}", *args]


def _index(source: str, where: str, out: Path, study_uids: str | None = None) -> float:
    flags = ["--dicom_root", where] if source == "folder" else ["--dicomweb_url", where]
    if study_uids:
        flags += ["--study_uid", study_uids]
    shutil.rmtree(out, ignore_errors=True)
    return _timed(_job("index", "--output_dir", str(out), *flags))


def _rows(metadata: Path) -> int:
    return len(metadata.read_text().splitlines()) - 1


def _images(out: Path) -> list[bytes]:
    """Every stored image's bytes, in shard order."""
    return [
        records.parse_example(serialized)["image"].tobytes()
        for part in sorted(out.glob("*/part-*.tfrecord.gz"))
        for serialized in tfrecord.read_tfrecord_gz(str(part))
    ]


def _index_report(
    server: OrthancServer, archive: Path, small: Path, small_uids: str, workdir: Path
) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for source in SOURCES:
        where_all = str(archive) if source == "folder" else server.dicomweb_url
        where_small = str(small) if source == "folder" else server.dicomweb_url
        uids = None if source == "folder" else small_uids
        seconds_small = _index(source, where_small, workdir / "index_small" / source, uids)
        seconds_all = _index(source, where_all, workdir / "index" / source)
        n_small = _rows(workdir / "index_small" / source / "metadata.csv")
        n_all = _rows(workdir / "index" / source / "metadata.csv")
        report[source] = {
            "instances": n_all,
            "wall_seconds": seconds_all,
            "instances_per_s": round(n_all / seconds_all, 1),
            "small_instances": n_small,
            "small_wall_seconds": seconds_small,
            "steady_instances_per_s": round((n_all - n_small) / (seconds_all - seconds_small), 1),
        }
    return report


def _study_uids(metadata: Path) -> str:
    import csv

    with metadata.open(newline="") as handle:
        return ",".join(sorted({row["StudyInstanceUID"] for row in csv.DictReader(handle)}))


def _preprocess_report(
    server: OrthancServer, archive: Path, subset: Path, workdir: Path, rounds: int
) -> dict[str, Any]:
    indexes = {source: workdir / "pre_index" / source for source in SOURCES}
    _index("folder", str(subset), indexes["folder"])
    # The same instances from the PACS: their studies, so both indexes list the same rows.
    uids = _study_uids(indexes["folder"] / "metadata.csv")
    _index("dicomweb", server.dicomweb_url, indexes["dicomweb"], uids)
    flags = {
        "folder": ["--archive_root", str(subset)],
        "dicomweb": ["--dicomweb_url", server.dicomweb_url],
    }
    timings: list[dict[str, Any]] = []
    images: dict[str, list[bytes]] = {}
    for index in range(rounds):
        order = list(SOURCES) if index % 2 == 0 else list(reversed(SOURCES))
        seconds: dict[str, Any] = {"order": order}
        for source in order:
            out = workdir / "pre" / source
            shutil.rmtree(out, ignore_errors=True)
            metadata = str(indexes[source] / "metadata.csv")
            seconds[source] = _timed(
                _job("preprocess", "--metadata", metadata, "--output_dir", str(out)) + flags[source]
            )
            images[source] = _images(out)
        timings.append(seconds)
    medians = {s: round(statistics.median(r[s] for r in timings), 2) for s in SOURCES}
    rows = _rows(indexes["folder"] / "metadata.csv")
    return {
        "images": rows,
        "rounds": timings,
        "median_wall_seconds": medians,
        "images_per_s": {s: round(rows / medians[s], 1) for s in SOURCES},
        "ratio": round(medians["folder"] / medians["dicomweb"], 3),
        "identical_images": images["folder"] == images["dicomweb"] and bool(images["folder"]),
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measures indexing and preprocessing from Orthanc and from files; the JSON-ready report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=600, help="preprocessed images")
    parser.add_argument("--index_images", type=int, default=5000, help="indexed instances")
    parser.add_argument("--small", type=int, default=200, help="the small index run's instances")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "dicomweb_throughput",
        help="archive, Orthanc storage and outputs (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    missing = orthanc_missing()
    if missing:
        raise SystemExit(f"error: {missing}")
    workdir = args.workdir.resolve()
    root = workdir / "archive"
    files = _archive(root, max(args.index_images, args.images))
    archive = _subset(files[: args.index_images], root, workdir / "indexed")
    small = _subset(files[: args.small], root, workdir / "indexed_small")
    subset = _subset(files[: args.images], root, workdir / "preprocessed")
    shutil.rmtree(workdir / "orthanc", ignore_errors=True)
    (workdir / "orthanc").mkdir(parents=True)
    with OrthancServer(workdir / "orthanc").running() as server:
        started = time.perf_counter()
        for path in files[: args.index_images]:
            server.upload(path)
        upload_seconds = round(time.perf_counter() - started, 1)
        _index("folder", str(small), workdir / "small_uids")
        small_uids = _study_uids(workdir / "small_uids" / "metadata.csv")
        report = {
            "index": _index_report(server, archive, small, small_uids, workdir),
            "preprocess": _preprocess_report(server, root, subset, workdir, args.rounds),
        }
    return {
        "machine": {"cores": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg()},
        "settings": {**{k: v for k, v in vars(args).items() if k != "workdir"}},
        "upload_seconds": upload_seconds,
        **report,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    print(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
