"""End to end: xray-score writes DICOM Structured Reports back (issue 22).

To a real PACS (Orthanc with its DICOMweb plugin, started by the test and
skipped with the reason where it is not installed): the reports are found
again with QIDO-RS, read back, and each references its image and carries its
score; a rerun adds nothing; a server stopped mid-run costs rejects, and the
next run stores what is missing. As files (``--results_dir``): the same
objects, valid for dciodvfy, pseudonymous with a key.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from beam_pipelines import index, score
from beam_pipelines.contracts import metadata as md
from beam_pipelines.contracts import predictions
from beam_pipelines.contracts import structured_report as sr
from beam_pipelines.storage import dicomweb
from tests.support.orthanc import OrthancServer, load_synthetic_archive, orthanc_server
from tests.support.runners import LOCAL_RUNNER

pytestmark = pytest.mark.slow

# Short, so that a stopped server turns into rejects in seconds.
QUICK = ["--dicomweb_retries", "1", "--dicomweb_timeout", "2"]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancServer, Path]]:
    """A PACS holding a small archive, and its index (read over DICOMweb)."""
    folder = tmp_path_factory.mktemp("orthanc_results")
    with orthanc_server(folder / "storage") as server:
        load_synthetic_archive(server, folder / "files", patients=5)
        out = folder / "index"
        index.run(["--output_dir", str(out), "--dicomweb_url", server.dicomweb_url, *LOCAL_RUNNER])
        yield server, out / "metadata.csv"


def _score(model: Path, metadata: Path, out: Path, *flags: str) -> dict[str, Any]:
    return score.run(
        ["--model", str(model / "model"), "--metadata", str(metadata), "--output", f"{out}/"]
        + [*flags, *LOCAL_RUNNER]
    )


def _predictions(out: Path) -> list[dict[str, Any]]:
    return predictions.read(sorted(str(p) for p in out.glob("part-*.parquet"))).to_pylist()


def _rejects(out: Path) -> list[dict[str, Any]]:
    text = (out / "rejects" / "rejects.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _reports_in(server: OrthancServer) -> list[dict[str, Any]]:
    """Every SR the PACS holds, found with QIDO-RS and read back with WADO-RS."""
    settings = dicomweb.DicomwebSettings(url=server.dicomweb_url)
    found = []
    for hit in dicomweb.search(settings, "instances", {"Modality": "SR"}, 100):
        study, series, sop = (hit[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018"))
        path = settings.instance_path(study, series, sop)
        found.append(sr.read_report(dicomweb.fetch_instance(path, settings, 1 << 24)))
    return found


def test_reports_stored_to_the_pacs_reference_their_images_once(
    pacs: tuple[OrthancServer, Path], trained_model: Path, tmp_path: Path
) -> None:
    server, metadata = pacs
    flags = ["--dicomweb_url", server.dicomweb_url, "--results_to", server.dicomweb_url]
    summary = _score(trained_model, metadata, tmp_path / "first", *flags)
    scored = _predictions(tmp_path / "first")
    assert summary["scored"] == len(scored) > 0
    results = summary["results"]
    assert (results["stored"], results["already_present"], results["refused"]) == (
        len(scored),
        0,
        0,
    )
    reports = _reports_in(server)
    assert len(reports) == len(scored)
    # Each report names its image (the index's path ends with its SOP Instance UID),
    # in the image's study, with the score and the finding the predictions hold.
    by_image = {row["dicom_path"].rsplit("/", 1)[1]: row for row in scored}
    studies = {
        row[md.SOP_INSTANCE_UID]: row[md.STUDY_INSTANCE_UID] for row in _index_rows(metadata)
    }
    model_id = summary["model_id"]
    for report in reports:
        prediction = by_image[report["referenced_sop_instance_uid"]]
        assert report["score"] == pytest.approx(prediction["score"], abs=1e-6)
        assert report["finding"] == prediction["predicted"]
        assert report["study_instance_uid"] == studies[report["referenced_sop_instance_uid"]]
        assert report["model_id"] == model_id
    assert len({r["sop_instance_uid"] for r in reports}) == len(reports)
    # One new series per study for the run.
    assert len({r["series_instance_uid"] for r in reports}) == len(set(studies.values()))

    again = _score(trained_model, metadata, tmp_path / "again", *flags)
    assert (again["results"]["stored"], again["results"]["already_present"]) == (0, len(scored))
    assert len(_reports_in(server)) == len(scored)

    # Removing the run's reports as docs/structured_reports.md shows: its series found
    # by their number (QIDO-RS; Orthanc 1.10 does not match SeriesDescription) and checked
    # by their description, then deleted with the PACS's own API (Orthanc's REST).
    settings = dicomweb.DicomwebSettings(url=server.dicomweb_url)
    query = {"Modality": "SR", "SeriesNumber": str(summary["results"]["series_number"])}
    hits = list(dicomweb.search(settings, "series", {**query, "includefield": "0008103E"}, 100))
    assert {hit["0008103E"]["Value"][0] for hit in hits} == {
        summary["results"]["series_description"]
    }
    series = [hit["0020000E"]["Value"][0] for hit in hits]
    assert sorted(series) == sorted({r["series_instance_uid"] for r in reports})
    for uid in series:
        [found] = requests.post(f"{server.url}/tools/lookup", data=uid, timeout=10).json()
        requests.delete(f"{server.url}/series/{found['ID']}", timeout=10).raise_for_status()
    assert _reports_in(server) == []


def _index_rows(metadata: Path) -> list[dict[str, str]]:
    import csv

    with metadata.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_pacs_stopped_mid_run_costs_result_rejects_and_the_rerun_stores_the_rest(
    synthetic_archive: Path,
    trained_model: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    metadata = synthetic_archive / "metadata.csv"
    with orthanc_server(tmp_path_factory.mktemp("orthanc_stopped")) as server:
        flags = ["--results_to", server.dicomweb_url, *QUICK]
        # Down from the start of the work (after the job's own check of the
        # server) until the job has ended: every report fails to be stored.
        down = threading.Thread(target=_stop_when_working, args=(server, tmp_path / "first"))
        down.start()
        first = _score(trained_model, metadata, tmp_path / "first", *flags)
        down.join()
        scored = _predictions(tmp_path / "first")
        assert first["scored"] == len(scored) > 0
        assert first["inputs"] == first["scored"] + first["rejected"]
        results = first["results"]
        assert (results["stored"], results["refused"]) == (0, len(scored))
        assert results["refused_by_reason"] == {"store_failed": len(scored)}
        result_rejects = [r for r in _rejects(tmp_path / "first") if r["stage"] == "results"]
        assert sorted(r["dicom_path"] for r in result_rejects) == sorted(
            r["dicom_path"] for r in scored
        )
        assert all("connection refused" in r["detail"] for r in result_rejects)

        server.start()
        second = _score(trained_model, metadata, tmp_path / "second", *flags)
        assert (second["results"]["stored"], second["results"]["refused"]) == (len(scored), 0)
        assert len(_reports_in(server)) == len(scored)


def _stop_when_working(server: OrthancServer, out: Path) -> None:
    deadline = time.monotonic() + 120
    work = out.parent / f".{out.name}.work"
    while not work.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    server.stop(graceful=False)


def _refused(model: Path, metadata: Path, out: Path, capsys: Any, *flags: str) -> list[str]:
    """The stderr lines of a run refused before any work (exit 2, nothing written)."""
    with pytest.raises(SystemExit) as stopped:
        _score(model, metadata, out, *flags)
    assert stopped.value.code == 2
    assert not out.exists()
    return capsys.readouterr().err.strip().splitlines()


def test_a_pacs_down_at_start_is_one_line_and_exit_2(
    synthetic_archive: Path, trained_model: Path, tmp_path: Path, capsys: Any
) -> None:
    from tests.support.runners import free_port

    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    metadata = synthetic_archive / "metadata.csv"
    [line] = _refused(trained_model, metadata, tmp_path / "out", capsys, "--results_to", closed)
    assert "--results_to" in line and closed in line


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        # A pseudonymous report in a clinical PACS is an error unless asked for.
        (
            ["--results_to", "http://127.0.0.1:9/dw", "--pseudonymize_key", "k" * 32],
            "--results_to_pseudonymized",
        ),
        (["--results_to_pseudonymized"], "--results_to_pseudonymized"),
        (["--results_to", "ftp://pacs/dw"], "--results_to"),
        (["--results_dir", "x", "--results_batch_size", "0"], "--results_batch_size"),
    ],
)
def test_results_flags_that_cannot_work_are_refused_before_any_work(
    synthetic_archive: Path,
    trained_model: Path,
    tmp_path: Path,
    capsys: Any,
    flags: list[str],
    named: str,
) -> None:
    metadata = synthetic_archive / "metadata.csv"
    error = _refused(trained_model, metadata, tmp_path / "out", capsys, *flags)[-1]
    assert error.startswith("xray-score: error:") and named in error


def test_reports_need_dicom_inputs_not_shards(
    preprocessed: Path, trained_model: Path, tmp_path: Path, capsys: Any
) -> None:
    with pytest.raises(SystemExit) as stopped:
        score.run(
            ["--model", str(trained_model / "model"), "--data_dir", str(preprocessed)]
            + ["--output", f"{tmp_path / 'out'}/", "--results_dir", str(tmp_path / "r")]
        )
    assert stopped.value.code == 2
    assert "needs DICOM inputs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "r").exists()


def test_reports_as_files_are_valid_dicom_and_pseudonymous_with_a_key(
    synthetic_archive: Path, trained_model: Path, tmp_path: Path
) -> None:
    metadata = synthetic_archive / "metadata.csv"
    reports = tmp_path / "reports"
    summary = _score(trained_model, metadata, tmp_path / "plain", "--results_dir", str(reports))
    files = sorted(reports.rglob("*.dcm"))
    assert len(files) == summary["scored"] == summary["results"]["stored"]
    # <study>/<series>/<instance>.dcm, and each names its own UIDs.
    for path in files[:5]:
        ds = pydicom.dcmread(path)
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, path.stem) == (
            path.parent.parent.name,
            path.parent.name,
            ds.SOPInstanceUID,
        )
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy:
        for path in files[:3]:
            check = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
            assert "Error" not in check.stdout + check.stderr, check.stderr

    again = _score(trained_model, metadata, tmp_path / "again", "--results_dir", str(reports))
    assert (again["results"]["stored"], again["results"]["already_present"]) == (
        0,
        summary["scored"],
    )
    assert sorted(reports.rglob("*.dcm")) == files

    key = ["--pseudonymize_key", "k" * 32]
    hidden = tmp_path / "hidden"
    _score(trained_model, metadata, tmp_path / "pseudo", "--results_dir", str(hidden), *key)
    originals = {
        value
        for path in sorted((synthetic_archive).rglob("*.dcm"))[:20]
        for value in _identifiers(path)
    }
    for path in sorted(hidden.rglob("*.dcm")):
        data = path.read_bytes()
        assert not [value for value in originals if value.encode() in data], path


def _identifiers(path: Path) -> list[str]:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # the archive's broken files
        return []
    keywords = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    return [str(ds.get(k)) for k in keywords if len(str(ds.get(k) or "")) >= 6]
