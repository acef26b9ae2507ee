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
  ``identical_images`` says whether both runs stored the same image bytes for
  every instance (by SOP Instance UID: a record's shard is chosen by a hash
  of its path, which differs between the two).

The machine may be shared and noisy: sides alternate, and every round is in
the report with the medians.

    .venv/bin/python benchmarks/dicomweb_throughput.py --index_images 5000 > dicomweb.json
"""

from __future__ import annotations

import argparse
import csv
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

import pydicom
from engine_wall_time import _archive as _cut_archive  # this folder: run as a script

from beam_pipelines.contracts import records
from beam_pipelines.storage import tfrecord
from engines.orthanc import OrthancServer, orthanc_missing

logger = logging.getLogger(__name__)

SOURCES = ("folder", "dicomweb")


#: A synthetic file and its study, (PatientID, StudyID).
Entry = tuple[Path, tuple[str, str]]


def _archive(workdir: Path, images: int) -> tuple[Path, list[Entry]]:
    """engine_wall_time's archive (written once) and its first `images` files, in row order."""
    metadata = _cut_archive(workdir, images + 8)  # room to end at a study's end
    with metadata.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    entries = [(metadata.parent / r["DicomPath"], (r["PatientID"], r["StudyID"])) for r in rows]
    return metadata.parent, entries


def _whole_studies(entries: list[Entry], count: int) -> list[Path]:
    """The first `count` files and the rest of the last one's study.

    The PACS side selects by study, so both sides then hold the same instances.
    """
    end = count
    while end < len(entries) and entries[end][1] == entries[end - 1][1]:
        end += 1
    return [path for path, _ in entries[:end]]


def _subset(files: list[Path], root: Path, folder: Path) -> Path:
    """A folder of hard links to `files` (their paths under `root` kept): an archive of its own.

    Not symlinks: the jobs reject a path whose real location leaves the archive root.
    """
    if folder.exists():
        return folder
    for path in files:
        link = folder / path.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, link)
        except OSError:  # another filesystem
            shutil.copyfile(path, link)
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


def _labels(root: Path, files: list[Path], path: Path) -> Path:
    """The files' labels (xray-synth's metadata.csv) keyed by SOP Instance UID."""

    with (root / "metadata.csv").open(newline="") as handle:
        label = {root / row["DicomPath"]: row["Abnormal"] for row in csv.DictReader(handle)}
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["SOPInstanceUID", "Abnormal"])
        for file in files:
            header = pydicom.dcmread(
                file, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
            )
            writer.writerow([header.SOPInstanceUID, label[file]])
    return path


def _index(
    source: str, where: str, out: Path, study_uids: str | None = None, labels: Path | None = None
) -> float:
    flags = ["--dicom_root", where] if source == "folder" else ["--dicomweb_url", where]
    if study_uids:
        flags += ["--study_uid", study_uids]
    if labels:
        flags += ["--labels", str(labels), "--labels_key", "SOPInstanceUID"]
    shutil.rmtree(out, ignore_errors=True)
    return _timed(_job("index", "--output_dir", str(out), *flags))


def _rows(metadata: Path) -> int:
    return len(metadata.read_text().splitlines()) - 1


def _images(out: Path) -> dict[str, bytes]:
    """Every stored image's bytes by SOP Instance UID (a record's shard follows its path)."""
    images = {}
    for part in out.glob("*/part-*.tfrecord.gz"):
        for serialized in tfrecord.read_tfrecord_gz(str(part)):
            record = records.parse_example(serialized)
            images[record["sop_instance_uid"]] = record["image"].tobytes()
    return images


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
    with metadata.open(newline="") as handle:
        return ",".join(sorted({row["StudyInstanceUID"] for row in csv.DictReader(handle)}))


def _preprocess_report(
    server: OrthancServer, subset: Path, labels: Path, workdir: Path, rounds: int
) -> dict[str, Any]:
    indexes = {source: workdir / "pre_index" / source for source in SOURCES}
    _index("folder", str(subset), indexes["folder"], labels=labels)
    # The same instances from the PACS: their studies, so both indexes list the same rows.
    uids = _study_uids(indexes["folder"] / "metadata.csv")
    _index("dicomweb", server.dicomweb_url, indexes["dicomweb"], uids, labels)
    flags = {
        "folder": ["--archive_root", str(subset)],
        "dicomweb": ["--dicomweb_url", server.dicomweb_url],
    }
    timings: list[dict[str, Any]] = []
    images: dict[str, dict[str, bytes]] = {}
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
    if not args.small < args.index_images or args.images > args.index_images:
        parser.error("need --small < --index_images and --images <= --index_images")
    root, entries = _archive(workdir, args.index_images)
    files = _whole_studies(entries, args.index_images)
    archive = _subset(files, root, workdir / "indexed")
    small = _subset(_whole_studies(entries, args.small), root, workdir / "indexed_small")
    preprocessed = _whole_studies(entries, args.images)
    subset = _subset(preprocessed, root, workdir / "preprocessed")
    labels = _labels(root, preprocessed, workdir / "labels.csv")
    shutil.rmtree(workdir / "orthanc", ignore_errors=True)
    (workdir / "orthanc").mkdir(parents=True)
    with OrthancServer(workdir / "orthanc").running() as server:
        started = time.perf_counter()
        for path in files:
            server.upload(path)
        upload_seconds = round(time.perf_counter() - started, 1)
        _index("folder", str(small), workdir / "small_uids")
        small_uids = _study_uids(workdir / "small_uids" / "metadata.csv")
        report = {
            "index": _index_report(server, archive, small, small_uids, workdir),
            "preprocess": _preprocess_report(server, subset, labels, workdir, args.rounds),
        }
    return {
        "machine": {"cores": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg()},
        "settings": {**{k: v for k, v in vars(args).items() if k != "workdir"}},
        "upload_seconds": upload_seconds,
        **report,
    }


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    print(json.dumps(run(argv), indent=2))


if __name__ == "__main__":
    main()
