"""Patient data: no identifier in pseudonymized outputs or in any log, pseudonyms join across jobs.

End to end, as a user runs the jobs (subprocesses, their own logging), on the
synthetic archive with its broken rows, so rejects and decode errors are
exercised too.
"""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from beam_pipelines.contracts import records
from beam_pipelines.privacy import Pseudonymizer
from beam_pipelines.storage import tfrecord
from tests.support.runners import LOCAL_RUNNER

KEY = b"a-test-key-of-more-than-16-bytes"
REPO = Path(__file__).resolve().parents[1]


def _identifiers(archive: Path) -> set[str]:
    """Every PatientID, StudyID, DicomPath, name and SOP Instance UID of the archive."""
    found: set[str] = set()
    with (archive / "metadata.csv").open(newline="") as handle:
        for cells in csv.DictReader(handle):
            found |= {cells["PatientID"], cells["StudyID"], cells["DicomPath"]}
    for path in archive.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # the planted broken files
            continue
        found |= {str(ds.get("PatientName", "")), str(ds.get("SOPInstanceUID", ""))}
        found |= {str(ds.get("PatientID", "")), str(ds.get("StudyID", ""))}
    # Blank values, and 1-2 character study numbers that occur in any text.
    return {value for value in found if len(value) >= 4}


def _run(module: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module, *args, *LOCAL_RUNNER],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The terminal names the job's log file once; everything else the job said is there.
    (named,) = [line for line in done.stderr.splitlines() if ": log: " in line]
    log = Path(named.split(": log: ", 1)[1]).read_text()
    assert "INFO" in log  # the log holds what the terminal did not show
    return done.stdout + done.stderr + log


def _texts(folder: Path) -> dict[str, str]:
    """Every output file as text: shards and Parquet decoded to their values."""
    texts = {}
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        if path.name.endswith(".tfrecord.gz"):
            parsed = [records.parse_example(r) for r in tfrecord.read_tfrecord_gz(str(path))]
            texts[str(path)] = repr([{k: v for k, v in r.items() if k != "image"} for r in parsed])
        elif path.suffix == ".parquet":
            texts[str(path)] = pd.read_parquet(path).to_csv()
        elif path.suffix == ".gz":
            texts[str(path)] = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
        else:
            texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    return texts


def _leaks(texts: dict[str, str], identifiers: set[str]) -> list[tuple[str, str]]:
    return [(name, value) for name, text in texts.items() for value in identifiers if value in text]


@pytest.mark.slow
def test_pseudonymized_outputs_and_logs_hold_no_identifier(
    synthetic_archive: Path, trained_model: Path, tmp_path: Path
) -> None:
    identifiers = _identifiers(synthetic_archive)
    assert any(v.startswith("SYNTH^") for v in identifiers)  # names were collected
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    shards = tmp_path / "shards"
    logs = _run(
        "beam_pipelines.preprocess",
        "--metadata",
        str(synthetic_archive / "metadata.csv"),
        "--output_dir",
        str(shards),
        "--pseudonymize_key_file",
        str(key_file),
    )
    predictions = tmp_path / "predictions"
    logs += _run(
        "beam_pipelines.score",
        "--model",
        str(trained_model / "model"),
        "--metadata",
        str(synthetic_archive / "metadata.csv"),
        "--output",
        str(predictions / "archive"),
        "--pseudonymize_key_file",
        str(key_file),
    )
    texts = {**_texts(shards), **_texts(predictions), "logs": logs}
    assert _leaks(texts, identifiers) == []

    # The same key gives the same pseudonyms in both jobs: results still join.
    pseudonymize = Pseudonymizer(KEY)
    with (synthetic_archive / "metadata.csv").open(newline="") as handle:
        patients = {cells["PatientID"] for cells in csv.DictReader(handle)} - {""}
    with (shards / "splits.csv").open(newline="") as handle:
        split_patients = {cells["PatientID"] for cells in csv.DictReader(handle)}
    assert split_patients <= {pseudonymize(p) for p in patients}
    scored = pd.concat(pd.read_parquet(p) for p in predictions.glob("*.parquet"))
    scored_patients = set(scored["patient_id"].dropna())
    assert scored_patients <= {pseudonymize(p) for p in patients}
    assert scored_patients & split_patients
    manifest = json.loads((shards / "manifest.json").read_text())
    summary = json.loads((predictions / "archive.summary.json").read_text())
    assert manifest["options"]["pseudonymized"] == summary["pseudonymized"]
    assert summary["pseudonymized"] == pseudonymize.fingerprint


@pytest.mark.slow
def test_logs_of_a_plain_run_hold_no_identifier(synthetic_archive: Path, tmp_path: Path) -> None:
    """Without a key the outputs keep IDs (that is their job); the logs still may not."""
    logs = _run(
        "beam_pipelines.preprocess",
        "--metadata",
        str(synthetic_archive / "metadata.csv"),
        "--output_dir",
        str(tmp_path / "shards"),
    )
    assert "rejected" in logs  # the run logged its outcome (broken rows included)
    assert _leaks({"logs": logs}, _identifiers(synthetic_archive)) == []


def test_scoring_shards_with_another_key_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Shards already hold pseudonyms of one key: mixing in another would break joins."""
    from beam_pipelines import score

    shards = tmp_path / "shards"
    (shards / "test").mkdir(parents=True)
    (shards / "test" / "part-00000-of-00001.tfrecord.gz").write_bytes(b"")
    manifest = {"options": {"pseudonymized": Pseudonymizer(KEY).fingerprint}}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.keras").write_bytes(b"")
    args = ["--model", str(model), "--data_dir", str(shards), "--output", str(tmp_path / "p")]
    with pytest.raises(SystemExit) as exited:
        score.run([*args, "--pseudonymize_key", "another key, 16+ bytes long"])
    assert exited.value.code == 2
    assert "differs from the one the shards were made with" in capsys.readouterr().err
