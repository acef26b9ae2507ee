"""Bad metadata.csv through the jobs: exit before any work, or every reject reconciled.

The policy (docs/metadata.md):
undecodable or structurally broken rows, paths leaving the archive root and
URIs of schemes not allowed reject their row; a file that is unusable as a
whole stops the job with exit 2 before any output is touched. The rules
themselves are tested where they live: contracts/test_metadata.py (encodings,
CSV structure), storage/test_paths.py (the archive root, symlinks),
transforms/test_rows.py (row validation, URI schemes, streaming).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from beam_pipelines import options
from beam_pipelines.contracts.rejects import VALIDATE_REASONS
from tests.support.data import REPO
from tests.support.runners import LOCAL_RUNNER

HEADER = "PatientID,StudyID,DicomPath,ViewPosition,Abnormal,Age,Sex,Site\n"


# --- Flags ----------------------------------------------------------------------------------


def test_allowed_schemes_flag() -> None:
    parser = argparse.ArgumentParser()
    options.add_input_arguments(parser)
    args = parser.parse_args(["--allowed_schemes", " S3, gs:// ,,hdfs"])
    assert options.allowed_schemes(args, "/archive", "/archive/metadata.csv") == {
        "s3",
        "gs",
        "hdfs",
    }
    default = parser.parse_args([])
    assert options.allowed_schemes(default, "/archive", "/archive/m.csv") == frozenset()
    assert options.allowed_schemes(default, "gs://b/archive", "s3://c/m.csv") == {"gs", "s3"}
    with pytest.raises(ValueError, match="not a URI scheme"):
        options.allowed_schemes(parser.parse_args(["--allowed_schemes", "g s"]))


# --- Command line ----------------------------------------------------------------------------


def _cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.fixture
def no_dicom_path_csv(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "metadata.csv"
    path.parent.mkdir()
    path.write_text("PatientID,Path,Label\nP1,a.dcm,true\n")
    return path


def test_preprocess_cli_missing_columns_exit_before_any_output(
    no_dicom_path_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = _cli(
        "beam_pipelines.preprocess", "--metadata", str(no_dicom_path_csv), "--output_dir", str(out)
    )
    assert done.returncode == 2, done.stderr
    assert "lacks required columns ['DicomPath', 'Abnormal']" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_score_cli_missing_columns_exit_before_any_output(
    no_dicom_path_csv: Path, tmp_path: Path
) -> None:
    model = tmp_path / "results" / "model"
    model.mkdir(parents=True)
    (model / "model.keras").write_bytes(b"")  # never loaded: the CSV check comes first
    out = tmp_path / "scores"
    out.mkdir()
    (out / "archive.summary.json").write_text("{}")  # an earlier run's output stays
    done = _cli(
        "beam_pipelines.score",
        "--model",
        str(model),
        "--metadata",
        str(no_dicom_path_csv),
        "--output",
        str(out / "archive"),
    )
    assert done.returncode == 2, done.stderr
    assert "lacks required columns ['DicomPath']" in done.stderr
    assert "Traceback" not in done.stderr
    # The earlier output untouched, nothing beside it (a refused run leaves no log).
    assert sorted(p.name for p in out.iterdir()) == ["archive.summary.json"]


def test_cli_bad_allowed_schemes_exit(tmp_path: Path) -> None:
    csv_path = tmp_path / "metadata.csv"
    csv_path.write_text(HEADER)
    done = _cli(
        "beam_pipelines.preprocess",
        "--metadata",
        str(csv_path),
        "--output_dir",
        str(tmp_path / "out"),
        "--allowed_schemes",
        "gs,not a scheme",
    )
    assert done.returncode == 2 and "--allowed_schemes: not a URI scheme" in done.stderr


# --- End to end: every new reason reconciles in the manifest and the summary ----------------------

#: (row, reason) of every broken row of `broken_archive`.
_EXPECTED_REJECTS = [
    (4, "path_escapes_root"),
    (5, "path_escapes_root"),
    (6, "scheme_not_allowed"),
    (7, "scheme_not_allowed"),
    (8, "bad_encoding"),
    (9, "ragged_row"),
    (10, "malformed_row"),
]


@pytest.fixture
def broken_archive(synthetic_archive: Path, tmp_path: Path) -> Path:
    """archive/metadata.csv: 3 good rows (one through an inner symlink), 7 of the new reasons."""
    with (synthetic_archive / "metadata.csv").open(newline="") as handle:
        good = list(csv.DictReader(handle))[:3]
    root, outside = tmp_path / "archive", tmp_path / "outside"
    (root / "raw").mkdir(parents=True)
    outside.mkdir()
    for k, row in enumerate(good):
        shutil.copy(synthetic_archive / row["DicomPath"], root / "raw" / f"{k}.dcm")
    shutil.copy(synthetic_archive / good[0]["DicomPath"], outside / "secret.dcm")
    (root / "inner_link.dcm").symlink_to(root / "raw" / "2.dcm")
    (root / "escape_link.dcm").symlink_to(outside / "secret.dcm")
    (root / "escape_dir").symlink_to(outside)

    def line(patient: str, path: str) -> bytes:
        return f"{patient},S,{path},PA,{'true' if patient[-1] in '13' else 'false'},40,F\n".encode()

    data = (
        b"PatientID,StudyID,DicomPath,ViewPosition,Abnormal,Age,Sex\r\n"
        + line("Q1", "raw/0.dcm")
        + line("Q2", "raw/1.dcm")
        + line("Q3", "inner_link.dcm")
        + line("Q4", "escape_link.dcm")
        + line("Q5", "escape_dir/secret.dcm")
        + line("Q6", "http://example.invalid/a.dcm")
        + line("Q7", "file:///etc/passwd")
        + line("Q8", "raw/0.dcm").replace(b"raw/0", b"raw/\xe9")
        + b"Q9,S,raw/1.dcm,PA\n"
        + b'Q10,S,"raw/1.dcm,PA,true,40,F\n'
        + b'Q11,S,"raw/2.dcm",PA,true,40,F\n'  # taken into Q10's row by its open quote
    )
    (root / "metadata.csv").write_bytes(data)
    return root


def _reject_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(r) for r in path.read_text().splitlines()]


@pytest.mark.slow
def test_preprocess_manifest_counts_every_reason(broken_archive: Path, tmp_path: Path) -> None:
    from beam_pipelines import preprocess

    out = tmp_path / "pre"
    manifest = preprocess.run(
        [
            "--metadata",
            str(broken_archive / "metadata.csv"),
            "--output_dir",
            str(out),
            *LOCAL_RUNNER,
        ]
    )
    assert (manifest["input_rows"], manifest["kept"]) == (10, 3)
    assert manifest["rejected_by_reason"] == {
        "bad_encoding": 1,
        "malformed_row": 1,
        "path_escapes_root": 2,
        "ragged_row": 1,
        "scheme_not_allowed": 2,
    }
    assert manifest["options"]["allowed_schemes"] == []
    rejects = _reject_lines(out / "rejects" / "rejects.jsonl")
    assert [(r["row"], r["reason"]) for r in rejects] == _EXPECTED_REJECTS
    assert rejects[4]["dicom_path"] == "raw/\\xe9.dcm"


@pytest.mark.slow
def test_score_summary_counts_every_reason(
    broken_archive: Path, trained_model: Path, tmp_path: Path
) -> None:
    from beam_pipelines import score

    prefix = tmp_path / "scores" / "archive"
    summary = score.run(
        [
            "--model",
            str(trained_model / "model"),
            "--metadata",
            str(broken_archive / "metadata.csv"),
            "--output",
            str(prefix),
            *LOCAL_RUNNER,
        ]
    )
    assert (summary["inputs"], summary["scored"]) == (10, 3)
    assert summary["rejected_by_reason"] == {
        "bad_encoding": 1,
        "malformed_row": 1,
        "path_escapes_root": 2,
        "ragged_row": 1,
        "scheme_not_allowed": 2,
    }
    rejects = _reject_lines(prefix.parent / "rejects" / "archive.jsonl")
    assert [(r["row"], r["reason"]) for r in rejects] == _EXPECTED_REJECTS


def test_docs_list_every_validate_reason() -> None:
    page = (REPO / "docs" / "metadata.md").read_text()
    missing = [r for r in VALIDATE_REASONS if f"`{r}`" not in page]
    assert not missing, f"docs/metadata.md lists no {missing}"
