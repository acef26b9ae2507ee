"""xray-index end to end: a folder (and a PACS) -> metadata.csv the other jobs accept."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from archive_tools import synth
from archive_tools.dicom_writer import PixelFormat, RadiographHeader, write_dicom
from beam_pipelines import index
from beam_pipelines.cli import EmptyRun
from beam_pipelines.contracts import index as ix
from beam_pipelines.contracts import metadata as md
from tests.support.runners import LOCAL_RUNNER, free_port

COLUMNS = [*md.COLUMNS, *md.INDEX_COLUMNS]


def _write(path: Path, header: RadiographHeader) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8)
    write_dicom(path, stored, PixelFormat(bits_stored=12), "explicit_le", header)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Five images of three patients, a copy of one, a text file."""
    root = tmp_path / "archive"
    for patient, study, number, view in (
        ("P1", "S1", 1, "PA"),
        ("P1", "S1", 2, "LATERAL"),
        ("P2", "S1", 1, "AP"),
        ("P3", "S1", 1, "PA"),
        ("P3", "S2", 1, "PA"),
    ):
        header = RadiographHeader(
            patient, study, view, instance_number=number, patient_age=50, patient_sex="M"
        )
        _write(root / patient / f"{study}_{number}.dcm", header)
    (root / "copies").mkdir()
    (root / "copies" / "x.dcm").write_bytes((root / "P2" / "S1_1.dcm").read_bytes())
    (root / "notes.txt").write_text("not an image\n")
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _accession(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).AccessionNumber)


def test_a_folder_becomes_an_ordered_index_with_labels(folder: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(
        f"AccessionNumber,Finding\n{_accession(folder / 'P1' / 'S1_1.dcm')},yes\n"
        f"{_accession(folder / 'P3' / 'S1_1.dcm')},0\nNOPE,1\n"
    )
    out = tmp_path / "index"
    argv = ["--dicom_root", str(folder), "--output_dir", str(out), "--labels", str(labels)]
    argv += ["--labels_key", "AccessionNumber", "--label_column", "Finding", *LOCAL_RUNNER]
    summary = index.run(argv)
    rows = _rows(out / ix.METADATA_FILE)
    assert list(rows[0]) == COLUMNS
    keys = [tuple(r[c] for c in md.INDEX_COLUMNS[:3]) for r in rows]
    assert keys == sorted(keys) and len(set(keys)) == 5
    by_path = {r[md.DICOM_PATH]: r for r in rows}
    assert set(by_path) == {
        "P1/S1_1.dcm",
        "P1/S1_2.dcm",
        "P2/S1_1.dcm",
        "P3/S1_1.dcm",
        "P3/S2_1.dcm",
    }
    p1 = by_path["P1/S1_2.dcm"]
    assert (p1[md.PATIENT_ID], p1[md.VIEW_POSITION], p1[md.AGE], p1[md.SEX]) == (
        "P1",
        "LATERAL",
        "50",
        "M",
    )
    assert [by_path[p][md.ABNORMAL] for p in ("P1/S1_1.dcm", "P1/S1_2.dcm")] == ["true", "true"]
    assert by_path["P3/S1_1.dcm"][md.ABNORMAL] == "false"
    assert by_path["P3/S2_1.dcm"][md.ABNORMAL] == ""
    assert summary["source"] == {
        "kind": "folder",
        "archive_root": str(folder),
        "dicomweb_url": None,
    }
    assert (summary["inputs"], summary["indexed"], summary["rejected"]) == (7, 5, 2)
    assert summary["rejected_by_reason"] == {"duplicate_instance": 1, "not_dicom": 1}
    assert summary["labels"]["labelled"] == 3 and summary["labels"]["unlabelled"] == 2
    assert summary["labels"]["unmatched_by_reason"] == {"no_image": 1}
    assert json.loads((out / ix.SUMMARY_FILE).read_text()) == summary
    assert _rows(out / ix.UNMATCHED_FILE) == [{"row": "3", "key": "NOPE", "reason": "no_image"}]
    rejects = [json.loads(x) for x in (out / ix.REJECTS_FILE).read_text().splitlines()]
    assert [(r["dicom_path"], r["reason"]) for r in rejects] == sorted(
        (r["dicom_path"], r["reason"]) for r in rejects
    )
    committed = json.loads((out / "commit.json").read_text())
    assert sorted(committed["files"]) == sorted([*summary["files"], ix.SUMMARY_FILE])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["commit.json", "metadata.csv", "rejects", "summary.json", "unmatched_labels.csv"]
    )
    # The index is deterministic: a rerun writes the same bytes.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    index.run(argv)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_the_kept_copy_of_a_duplicate_is_the_first_path(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    index.run(["--dicom_root", str(folder), "--output_dir", str(out), *LOCAL_RUNNER])
    paths = {r[md.DICOM_PATH] for r in _rows(out / ix.METADATA_FILE)}
    assert "P2/S1_1.dcm" in paths and "copies/x.dcm" not in paths  # "P" < "c" in text order
    rejects = [json.loads(x) for x in (out / ix.REJECTS_FILE).read_text().splitlines()]
    duplicate = next(r for r in rejects if r["reason"] == "duplicate_instance")
    assert duplicate["dicom_path"] == "copies/x.dcm" and "P2/S1_1.dcm" in duplicate["detail"]


def test_a_glob_indexes_relative_to_its_fixed_prefix(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    summary = index.run(
        ["--dicom_glob", f"{folder}/P3/*.dcm", "--output_dir", str(out), *LOCAL_RUNNER]
        + ["--modality", "DX", "--study_date", "20200101-"]
    )
    assert summary["source"]["archive_root"] == f"{folder}/P3"
    assert sorted(r[md.DICOM_PATH] for r in _rows(out / ix.METADATA_FILE)) == [
        "S1_1.dcm",
        "S2_1.dcm",
    ]


def test_everything_filtered_out_is_an_empty_run(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    with pytest.raises(EmptyRun, match="nothing was indexed"):
        index.run(
            ["--dicom_root", str(folder), "--output_dir", str(out), "--modality", "MR"]
            + LOCAL_RUNNER
        )
    assert not out.exists()


def test_a_failed_run_leaves_the_last_index(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "index"
    argv = ["--dicom_root", str(folder), "--output_dir", str(out), *LOCAL_RUNNER]
    index.run(argv)
    before = (out / ix.METADATA_FILE).read_bytes()
    (folder / "P9").mkdir()
    _write(folder / "P9" / "a.dcm", RadiographHeader("P9", "S1"))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(ix, "build_summary", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        index.run(argv)
    assert (out / ix.METADATA_FILE).read_bytes() == before
    assert not list(tmp_path.glob(".index.work*"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "exactly one source"),
        (["--dicom_root", "{folder}", "--dicom_glob", "{folder}/*"], "exactly one source"),
        (["--dicom_root", "{folder}/notes.txt"], "not a folder"),
        (["--dicom_root", "{folder}", "--study_date", "2020"], "--study_date"),
        (["--dicom_root", "{folder}", "--labels", "{labels}"], "--labels and --labels_key"),
        (
            ["--dicom_root", "{folder}", "--labels", "{labels}", "--labels_key", "PatientID"],
            "lacks required columns",
        ),
        (
            [
                "--dicom_root",
                "{folder}",
                "--labels",
                "{folder}/none.csv",
                "--labels_key",
                "PatientID",
            ],
            "not found",
        ),
        (["--dicomweb_url", "http://127.0.0.1:{port}/dicom-web"], "127.0.0.1"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("AccessionNumber,Abnormal\nA1,true\n")
    values = {"folder": str(folder), "labels": str(labels), "port": str(free_port())}
    argv = [f.format(**values) for f in flags]
    out = tmp_path / "index"
    with pytest.raises(SystemExit) as exit_:
        index.run([*argv, "--output_dir", str(out), "--dicomweb_retries", "0", *LOCAL_RUNNER])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error
    assert not out.exists()


def test_an_output_inside_the_archive_is_refused(
    folder: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        index.run(["--dicom_root", str(folder), "--output_dir", str(folder / "index")])
    assert exit_.value.code == 2
    assert "inside --dicom_root" in capsys.readouterr().err


# ------------------------------------------------------------------ slow: end to end


def _synth(root: Path, patients: int = 20) -> Path:
    synth.run(
        ["--output_dir", str(root), "--patients", str(patients), "--seed", "5"]
        + ["--min_size", "48", "--max_size", "64", "--workers", "1"]
    )
    return root


def _labels_by_accession(archive: Path, path: Path) -> dict[str, str]:
    """synth's labels keyed by each image's AccessionNumber (one per study)."""
    labels: dict[str, str] = {}
    for row in _rows(archive / "metadata.csv"):
        labels[_accession(archive / row[md.DICOM_PATH])] = row[md.ABNORMAL]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([md.ACCESSION_NUMBER, md.ABNORMAL])
        writer.writerows(sorted(labels.items()))
    return labels


@pytest.mark.slow
def test_a_synthetic_archive_indexes_to_its_own_metadata_and_preprocesses(tmp_path: Path) -> None:
    archive = _synth(tmp_path / "archive")
    labels = tmp_path / "labels.csv"
    _labels_by_accession(archive, labels)
    out = tmp_path / "index"
    done = subprocess.run(
        [sys.executable, "-m", "beam_pipelines.index", "--dicom_root", str(archive / "raw")]
        + ["--output_dir", str(out), "--labels", str(labels), "--labels_key", "AccessionNumber"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert f"--archive_root {archive / 'raw'}" in last
    expected = {f"raw/{r[md.DICOM_PATH][4:]}": r for r in _rows(archive / "metadata.csv")}
    rows = _rows(out / ix.METADATA_FILE)
    assert len(rows) == len(expected)
    for row in rows:
        synth_row = expected[f"raw/{row[md.DICOM_PATH]}"]
        for column in md.COLUMNS:
            if column != md.DICOM_PATH:
                assert row[column] == synth_row[column], column
    # No PHI in the log: no patient ID, UID or accession number.
    log = (tmp_path / "logs" / "xray-index.log").read_text()
    for row in rows[:20]:
        for column in (md.PATIENT_ID, md.SOP_INSTANCE_UID, md.ACCESSION_NUMBER):
            assert row[column] not in log
    from beam_pipelines import preprocess

    result = preprocess.run(
        ["--metadata", str(out / ix.METADATA_FILE), "--archive_root", str(archive / "raw")]
        + ["--output_dir", str(tmp_path / "pre"), *LOCAL_RUNNER]
    )
    assert result["kept"] == len(rows) and result["rejected"] == 0


def test_the_module_runs_as_a_script(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "beam_pipelines.index", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--dicom_root" in done.stdout
