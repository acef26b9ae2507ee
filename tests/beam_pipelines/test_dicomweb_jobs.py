"""End to end over a real PACS: Orthanc's DICOMweb -> xray-index -> xray-preprocess / xray-score.

The archive is uploaded to an Orthanc started by the test (skipped, with the
reason, where Orthanc or its DICOMweb plugin is not installed) and also
indexed as a folder, so every result over DICOMweb is compared with the same
files read directly.
"""

from __future__ import annotations

import contextlib
import csv
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from archive_tools import synth
from beam_pipelines import index, preprocess, score
from beam_pipelines.contracts import metadata as md
from beam_pipelines.contracts import predictions, records
from beam_pipelines.storage import tfrecord
from tests.support.orthanc import OrthancServer, orthanc_server
from tests.support.runners import LOCAL_RUNNER, free_port

pytestmark = pytest.mark.slow

SPLITS = ("train", "validation", "test")
# Short, so that a stopped server turns into rejects in seconds.
QUICK_FETCH = ["--dicomweb_retries", "1", "--dicomweb_timeout", "2"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small archive in every transfer syntax the generator writes."""
    root = tmp_path_factory.mktemp("pacs_archive") / "archive"
    synth.run(
        ["--output_dir", str(root), "--patients", "12", "--seed", "11"]
        + ["--min_size", "48", "--max_size", "96", "--workers", "1"]
    )
    return root


@pytest.fixture(scope="module")
def pacs(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with _loaded_server(archive, tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def labels(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The archive's labels keyed by study (as a report system would key them)."""
    import pydicom

    with (archive / "metadata.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    path = tmp_path_factory.mktemp("labels") / "labels.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([md.STUDY_INSTANCE_UID, md.ABNORMAL])
        seen = set()
        for row in rows:
            header = pydicom.dcmread(archive / row[md.DICOM_PATH], stop_before_pixels=True)
            if header.StudyInstanceUID not in seen:
                seen.add(header.StudyInstanceUID)
                writer.writerow([header.StudyInstanceUID, row[md.ABNORMAL]])
    return path


def _index(out: Path, source: list[str], labels: Path) -> Path:
    index.run(
        ["--output_dir", str(out), *source, "--labels", str(labels)]
        + ["--labels_key", md.STUDY_INSTANCE_UID, *LOCAL_RUNNER]
    )
    return out / "metadata.csv"


@pytest.fixture(scope="module")
def folder_index(archive: Path, labels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _index(tmp_path_factory.mktemp("folder_index"), ["--dicom_root", str(archive)], labels)


@pytest.fixture(scope="module")
def pacs_index(pacs: OrthancServer, labels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = ["--dicomweb_url", pacs.dicomweb_url]
    return _index(tmp_path_factory.mktemp("pacs_index"), source, labels)


def _rows(metadata: Path) -> list[dict[str, str]]:
    with metadata.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _preprocess(metadata: Path, out: Path, *flags: str) -> dict[str, Any]:
    return preprocess.run(
        ["--metadata", str(metadata), "--output_dir", str(out), *flags, *LOCAL_RUNNER]
    )


def _records(out: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        split: [
            records.parse_example(serialized)
            for part in sorted((out / split).glob("part-*.tfrecord.gz"))
            for serialized in tfrecord.read_tfrecord_gz(str(part))
        ]
        for split in SPLITS
    }


def _rejects(out: Path) -> list[dict[str, Any]]:
    text = (out / "rejects" / "rejects.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_both_indexes_list_the_same_instances_in_the_same_order(
    folder_index: Path, pacs_index: Path, pacs: OrthancServer
) -> None:
    from_folder, from_pacs = _rows(folder_index), _rows(pacs_index)
    assert len(from_folder) == len(from_pacs) > 0
    for file_row, pacs_row in zip(from_folder, from_pacs, strict=True):
        assert {k: v for k, v in file_row.items() if k != md.DICOM_PATH} == {
            k: v for k, v in pacs_row.items() if k != md.DICOM_PATH
        }
        study, series, sop = (file_row[c] for c in md.INDEX_COLUMNS[:3])
        assert pacs_row[md.DICOM_PATH] == (
            f"dicomweb+{pacs.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}"
        )
        assert pacs_row[md.ABNORMAL] in ("true", "false")
    summary = json.loads((pacs_index.parent / "summary.json").read_text())
    assert summary["source"] == {
        "kind": "dicomweb",
        "archive_root": None,
        "dicomweb_url": pacs.dicomweb_url,
    }
    assert summary["indexed"] == len(from_pacs) and summary["labels"]["unlabelled"] == 0


def test_shards_from_the_pacs_equal_shards_from_the_files(
    archive: Path, folder_index: Path, pacs_index: Path, pacs: OrthancServer, tmp_path: Path
) -> None:
    from_files = _preprocess(folder_index, tmp_path / "files", "--archive_root", str(archive))
    from_pacs = _preprocess(pacs_index, tmp_path / "pacs", "--dicomweb_url", pacs.dicomweb_url)
    assert from_pacs["rejected"] == from_files["rejected"] == 0
    assert from_pacs["counts"] == from_files["counts"]
    assert from_pacs["train_pixel_stats"] == from_files["train_pixel_stats"]
    file_records, pacs_records = _records(tmp_path / "files"), _records(tmp_path / "pacs")
    for split in SPLITS:
        assert len(file_records[split]) == len(pacs_records[split])
        for direct, fetched in zip(file_records[split], pacs_records[split], strict=True):
            # The same bytes decoded: every field equal, the image to the last bit;
            # only the path names where the bytes came from.
            assert fetched["image"].tobytes() == direct["image"].tobytes()
            assert fetched["dicom_path"].endswith(direct["sop_instance_uid"])
            for name in direct.keys() - {"image", "dicom_path"}:
                assert fetched[name] == direct[name], name


def test_scoring_from_the_index(
    archive: Path,
    folder_index: Path,
    pacs_index: Path,
    pacs: OrthancServer,
    trained_model: Path,
    tmp_path: Path,
) -> None:
    def scored(metadata: Path, name: str, *flags: str) -> list[dict[str, Any]]:
        out = tmp_path / name
        score.run(
            ["--model", str(trained_model / "model"), "--metadata", str(metadata)]
            + ["--output", f"{out}/", *flags, *LOCAL_RUNNER]
        )
        return predictions.read(sorted(str(p) for p in out.glob("part-*.parquet"))).to_pylist()

    direct = scored(folder_index, "files", "--archive_root", str(archive))
    fetched = scored(pacs_index, "pacs", "--dicomweb_url", pacs.dicomweb_url)
    assert len(fetched) == len(direct) == len(_rows(pacs_index))
    by_instance = {row["dicom_path"].rsplit("/", 1)[1]: row for row in fetched}
    for row in direct:
        sop = next(r for r in _rows(folder_index) if r[md.DICOM_PATH] == row["dicom_path"])
        twin = by_instance[sop[md.SOP_INSTANCE_UID]]
        assert twin["score"] == row["score"] and twin["label"] == row["label"]


def test_an_instance_deleted_after_indexing_is_rejected_with_its_status(
    archive: Path, labels: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with _loaded_server(archive, tmp_path_factory.mktemp("orthanc_deleted")) as server:
        metadata = _index(tmp_path / "index", ["--dicomweb_url", server.dicomweb_url], labels)
        rows = _rows(metadata)
        gone = rows[3]
        server.delete_instance(gone[md.SOP_INSTANCE_UID])
        result = _preprocess(metadata, tmp_path / "out", "--dicomweb_url", server.dicomweb_url)
    rejects = _rejects(tmp_path / "out")
    assert result["input_rows"] == len(rows) == result["kept"] + result["rejected"]
    assert [(r["row"], r["stage"], r["reason"]) for r in rejects] == [(4, "decode", "fetch_failed")]
    assert "404" in rejects[0]["detail"]
    assert rejects[0]["dicom_path"] == gone[md.DICOM_PATH]


@contextlib.contextmanager
def _loaded_server(archive: Path, folder: Path) -> Iterator[OrthancServer]:
    """A server of its own (these tests change what it holds or stop it), archive uploaded."""
    with orthanc_server(folder) as server:
        for path in sorted((archive / "raw").rglob("*.dcm")):
            server.upload(path)
        yield server


def test_a_server_restarted_mid_run_costs_rejects_never_rows(
    archive: Path, labels: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with _loaded_server(archive, tmp_path_factory.mktemp("orthanc_restart")) as server:
        metadata = _index(tmp_path / "index", ["--dicomweb_url", server.dicomweb_url], labels)
        rows = _rows(metadata)
        # Down for a while from the first fetch on: the retries of the rows
        # read then give up; the server comes back and the rest are read.
        outage = threading.Thread(target=_outage, args=(server, tmp_path / "out"), daemon=True)
        outage.start()
        result = _preprocess(
            metadata, tmp_path / "out", "--dicomweb_url", server.dicomweb_url, *QUICK_FETCH
        )
        outage.join()
    rejects = _rejects(tmp_path / "out")
    assert result["input_rows"] == len(rows) == result["kept"] + result["rejected"]
    assert result["kept"] > 0 and rejects
    assert {r["reason"] for r in rejects} == {"fetch_failed"}
    assert len({r["row"] for r in rejects}) == len(rejects)


def _outage(server: OrthancServer, out: Path) -> None:
    deadline = time.monotonic() + 120
    while not out.parent.joinpath(".out.work").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop(graceful=False)  # as a crash would
    time.sleep(6)
    server.start()


def test_a_server_down_at_start_is_one_line_and_exit_2(pacs_index: Path, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    scripts = Path(sys.executable).parent
    for job, flags in (
        ("xray-preprocess", ["--metadata", str(pacs_index), "--output_dir"]),
        ("xray-index", ["--output_dir"]),
    ):
        done = subprocess.run(
            [str(scripts / job), *flags, str(tmp_path / job), "--dicomweb_url", closed],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and closed in lines[0], done.stderr
        assert not (tmp_path / job).exists()
