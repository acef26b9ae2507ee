"""The jobs used as a careless or hostile user would: nothing lost, mixed or hung.

Each case runs the console entry points in subprocesses on real files and
checks what a user sees (exit code, one line on stderr, no traceback) and what
is left: the input files' bytes and the previous output are unchanged after
every failure, and concurrent runs never mix. Disk-full and read-only cases
mount a small tmpfs (root only; skipped otherwise).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_pipelines import preprocess, score
from beam_pipelines.contracts import predictions
from tests.support.files import is_job_log
from tests.support.runners import LOCAL_RUNNER

pytestmark = pytest.mark.slow


def _tree(root: Path) -> dict[str, str]:
    """Digest of every file below root (hidden ones too), lock files and job logs aside.

    A job's log (``logs/<job>.log`` beside its output) grows with every run,
    refused ones too; it is not part of any output.
    """
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock") and not is_job_log(p)
    }


def _job(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _preprocess(
    metadata: Path, output_dir: Path, *flags: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return _job(
        "beam_pipelines.preprocess",
        *("--metadata", str(metadata), "--output_dir", str(output_dir), *flags),
        timeout=timeout,
    )


def _refused(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Asserts the exit code and a one-line error naming the needles; returns that line."""
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if ": error: " in x or ": warning: " in x]
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture()
def archive(synthetic_archive: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic archive (tests may add files to it)."""
    copy = tmp_path / "archive"
    shutil.copytree(synthetic_archive, copy)
    return copy


@contextlib.contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ------------------------------------------------------------ inputs are never touched


def test_an_archive_as_output_dir_is_refused_and_no_input_is_touched(archive: Path) -> None:
    # The archive holds a file whose name a careless clean-up would match.
    (archive / "train").mkdir()
    shutil.copy(next((archive / "raw").rglob("*.dcm")), archive / "train" / "part-1.dcm")
    before = _tree(archive)
    done = _preprocess(archive / "metadata.csv", archive)
    _refused(done, 2, "--output_dir", "metadata.csv lies inside the output")
    assert _tree(archive) == before


def test_metadata_inside_the_output_is_refused(preprocessed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(preprocessed, out)
    before = _tree(out)
    done = _preprocess(out / "splits.csv", out)
    _refused(done, 2, "--metadata", "splits.csv")
    assert _tree(out) == before


def test_glob_characters_in_outputs_never_reach_a_neighbour(
    synthetic_archive: Path, trained_model: Path, tmp_path: Path
) -> None:
    metadata = str(synthetic_archive / "metadata.csv")
    preprocess.run(["--metadata", metadata, "--output_dir", str(tmp_path / "runA"), *LOCAL_RUNNER])
    neighbour = _tree(tmp_path / "runA")
    preprocess.run(["--metadata", metadata, "--output_dir", str(tmp_path / "run?"), *LOCAL_RUNNER])
    preprocess.run(["--metadata", metadata, "--output_dir", str(tmp_path / "run?"), *LOCAL_RUNNER])
    assert _tree(tmp_path / "runA") == neighbour
    assert _tree(tmp_path / "run?") == neighbour  # the same output, in its own folder
    # Training and scoring read the shards of 'run?' alone.
    from trainer.training_data import check_training_data

    manifest = json.loads((tmp_path / "run?" / "manifest.json").read_text())
    shards = check_training_data(str(tmp_path / "run?"), manifest)
    assert all("/run?/" in f for split in shards.values() for f in split), shards

    model = str(trained_model / "model")
    scores = tmp_path / "s"
    score.run(
        ["--model", model, "--metadata", metadata, "--output", str(scores / "keep"), *LOCAL_RUNNER]
    )
    kept = _tree(scores)
    score.run(
        ["--model", model, "--metadata", metadata, "--output", str(scores / "k?ep"), *LOCAL_RUNNER]
    )
    assert {k: v for k, v in _tree(scores).items() if "k?ep" not in k} == kept


# ------------------------------------------------------- a failed run keeps the last output


def _scored(synthetic_archive: Path, trained_model: Path, prefix: Path) -> dict[str, str]:
    score.run(
        [
            "--model",
            str(trained_model / "model"),
            "--metadata",
            str(synthetic_archive / "metadata.csv"),
            "--output",
            str(prefix),
            *LOCAL_RUNNER,
        ]
    )
    return _tree(prefix.parent)


def test_a_garbage_model_is_refused_before_work_and_the_last_scores_stay(
    synthetic_archive: Path, trained_model: Path, tmp_path: Path
) -> None:
    prefix = tmp_path / "scores" / "archive"
    before = _scored(synthetic_archive, trained_model, prefix)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.keras").write_bytes(b"not a model" * 100)
    done = _job(
        "beam_pipelines.score",
        "--model",
        str(garbage),
        "--metadata",
        str(synthetic_archive / "metadata.csv"),
        "--output",
        str(prefix),
    )
    _refused(done, 2, "--model", "model.keras is not a readable Keras model file")
    assert _tree(prefix.parent) == before


def test_disk_full_fails_in_one_line_and_keeps_the_last_output(
    synthetic_archive: Path, tmp_path: Path
) -> None:
    with _tmpfs(tmp_path / "small", "size=24m") as disk:
        out = disk / "out"
        args = ["--metadata", str(synthetic_archive / "metadata.csv"), "--output_dir", str(out)]
        preprocess.run([*args, *LOCAL_RUNNER])
        before = _tree(out)
        used = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        free = shutil.disk_usage(disk).free
        # Leave less room than one more output needs.
        (disk / "filler").write_bytes(b"\0" * max(0, free - used // 3))
        done = _job("beam_pipelines.preprocess", *args, *LOCAL_RUNNER)
        line = _refused(done, 1)
        assert "No space left on device" in line, line
        assert _tree(out) == before
        # Beside the output: its lock and the job's log (which says what failed).
        assert sorted(p.name for p in disk.iterdir()) == [".out.lock", "filler", "logs", "out"]


def test_concurrent_runs_never_mix_one_is_refused_naming_the_holder(
    synthetic_archive: Path, preprocessed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "beam_pipelines.preprocess",
        "--metadata",
        str(synthetic_archive / "metadata.csv"),
        "--output_dir",
        str(out),
    ]
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(run.wait(timeout=300), run.communicate()[1]) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, err in results]
    (refused,) = [err for code, err in results if code == 2]
    assert "another run is writing this output (host " in refused and ", pid " in refused
    assert _tree(out) == _tree(preprocessed)  # exactly one run's complete output


# --------------------------------------------------------------------- bounded decoding


def test_a_fifo_in_the_archive_is_rejected_within_seconds(archive: Path, tmp_path: Path) -> None:
    with (archive / "metadata.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    number, victim = next(
        (i, r["DicomPath"]) for i, r in enumerate(rows, 1) if r["DicomPath"].startswith("raw/")
    )
    (archive / victim).unlink()
    os.mkfifo(archive / victim)
    started = time.monotonic()
    done = _preprocess(archive / "metadata.csv", tmp_path / "out", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 120
    rejects = [
        json.loads(x)
        for x in (tmp_path / "out" / "rejects" / "rejects.jsonl").read_text().split("\n")
        if x
    ]
    (record,) = [r for r in rejects if r["row"] == number]
    assert record["reason"] == "unreadable" and "FIFO" in record["detail"]


# ---------------------------------------------------------- clear errors, before any work


def test_unusable_locations_and_inputs_are_one_line_errors(
    synthetic_archive: Path, tmp_path: Path
) -> None:
    metadata = str(synthetic_archive / "metadata.csv")
    (tmp_path / "a_file").write_text("x")
    done = _preprocess(Path(metadata), tmp_path / "a_file")
    _refused(done, 2, "a_file is a file, not a folder")
    done = _preprocess(synthetic_archive, tmp_path / "out")
    _refused(done, 2, "--metadata", "is a folder, not a file")
    assert not (tmp_path / "out").exists()
    with _tmpfs(tmp_path / "readonly", "size=1m,ro") as readonly:
        done = _preprocess(Path(metadata), readonly / "out")
        _refused(done, 2, "--output_dir", "Read-only file system")


def test_all_rejected_or_header_only_metadata_exits_3_and_keeps_the_last_output(
    synthetic_archive: Path, preprocessed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(preprocessed, out)
    before = _tree(out)
    missing = tmp_path / "missing.csv"
    missing.write_text("PatientID,DicomPath,Abnormal\nP1,nowhere/a.dcm,1\nP2,nowhere/b.dcm,0\n")
    done = _preprocess(missing, out, *LOCAL_RUNNER)
    line = _refused(done, 3, "no row was kept", '"missing_file": 2', "is unchanged")
    assert _tree(out) == before
    assert "rejects.jsonl" in line

    header_only = tmp_path / "header.csv"
    header_only.write_text("PatientID,DicomPath,Abnormal\n")
    done = _preprocess(header_only, out, *LOCAL_RUNNER)
    _refused(done, 3, "no row was kept: 0 rows")
    assert _tree(out) == before


def test_training_refuses_an_empty_validation_split_and_names_a_damaged_shard(
    preprocessed: Path, tmp_path: Path
) -> None:
    no_validation = tmp_path / "no_validation"
    shutil.copytree(preprocessed, no_validation)
    manifest = json.loads((no_validation / "manifest.json").read_text())
    manifest["counts"]["validation"] = {"normal": 0, "abnormal": 0}
    (no_validation / "manifest.json").write_text(json.dumps(manifest))
    train = ["--epochs", "1", "--steps_per_epoch", "1", "--global_batch_size", "4"]
    done = _job(
        "trainer.train",
        "--data_dir",
        str(no_validation),
        "--output_dir",
        str(tmp_path / "r"),
        *train,
    )
    _refused(done, 2, "validation split", "has no images")

    damaged = tmp_path / "damaged"
    shutil.copytree(preprocessed, damaged)
    (shard,) = sorted((damaged / "validation").glob("part-*"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    done = _job(
        "trainer.train", "--data_dir", str(damaged), "--output_dir", str(tmp_path / "r"), *train
    )
    _refused(done, 1, f"shard {shard} (", "is damaged; no record was skipped")
    assert not (tmp_path / "r").exists()  # nothing committed (the work folder stays to resume)


def _predictions(path: Path, scores: list[float], patients: list[str]) -> None:
    rows = len(scores)
    predictions.write(
        str(path),
        {
            "dicom_path": [f"{i}.dcm" for i in range(rows)],
            "patient_id": patients,
            "split": ["test"] * rows,
            "label": [i % 2 for i in range(rows)],
            "score": scores,
            "model_id": ["m"] * rows,
        },
    )


def test_analysis_names_bad_scores_and_empty_files_and_warns_on_few_patients(
    tmp_path: Path,
) -> None:
    good = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7]
    bad = tmp_path / "bad.parquet"
    table = pa.table(
        {"dicom_path": ["a", "b", "c"], "score": np.array([0.5, np.nan, 1.5], np.float32)}
    )
    pq.write_table(table, bad)
    out = str(tmp_path / "analysis")
    done = _job("analysis.analyze", "--predictions", str(bad), "--output_dir", out)
    _refused(done, 2, str(bad), "2 scores that are not probabilities", "rows 2, 3")

    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    done = _job("analysis.analyze", "--predictions", str(empty), "--output_dir", out)
    _refused(done, 2, str(empty), "is empty (0 bytes)")
    assert not Path(out).exists()

    one_patient = tmp_path / "one.parquet"
    _predictions(one_patient, good, ["P1"] * len(good))
    done = _job(
        "analysis.analyze",
        "--predictions",
        str(one_patient),
        "--output_dir",
        out,
        "--bootstrap",
        "20",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "only 1 patients in the evaluated split" in done.stderr
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    assert any("only 1 patients" in w for w in metrics["warnings"])


def test_an_output_inside_another_jobs_output_is_refused(
    preprocessed: Path, trained_model: Path, tmp_path: Path
) -> None:
    data = tmp_path / "preprocessed"
    shutil.copytree(preprocessed, data)
    before = _tree(data)
    done = _job(
        "beam_pipelines.score",
        "--model",
        str(trained_model / "model"),
        "--data_dir",
        str(data),
        "--output",
        str(data / "scores" / "x"),
    )
    _refused(done, 2, "lies inside", "an output of xray-preprocess")
    assert _tree(data) == before
