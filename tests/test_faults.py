"""Faults: jobs killed mid-run and run again, and a bug on one input.

A preprocessing or scoring job killed while it writes must leave the previous
output exactly as it was (it writes into a private work folder), and the same
command run again must leave exactly the files an uninterrupted run writes,
byte for byte: no partial or temporary file, no work or staging folder, no
duplicate. The kills are SIGKILLs of the whole process group (the local
runner's worker processes too) once some of the new output exists. An unexpected
exception on one input (a decoder bug, not a bad file) must reject that input
as ``internal_error``, without header values, and let the job finish.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from beam_pipelines import dicom, preprocess, score
from tests.support.files import is_job_log
from tests.support.runners import LOCAL_RUNNER

pytestmark = pytest.mark.slow

# The default local runner's mode, with the two workers this machine has.
MULTI_PROCESS = [
    "--runner=FnApiRunner",
    "--direct_running_mode=multi_processing",
    "--direct_num_workers=2",
]
# Header-like text an exception message could carry: never in a detail or log.
PHI = "DOE^JANE"


def _files(root: Path) -> dict[str, bytes]:
    """Every file below root (hidden ones too), by relative path; not lock files.

    A lock file names its last holder (host, pid, start time), so it differs
    between runs by design.
    """
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(".lock") and not is_job_log(p)
    }


def _assert_same_files(got: dict[str, bytes], expected: dict[str, bytes]) -> None:
    assert sorted(got) == sorted(expected)  # no leftover, missing or extra file
    for name, data in expected.items():
        assert got[name] == data, f"{name} differs from the uninterrupted run's"


def _kill_once_written(command: list[str], written: Callable[[], bool], log: Path) -> None:
    """Starts the job and SIGKILLs its process group as soon as written() holds.

    Tries again (up to 3 times) if the job finished before the kill landed.
    """
    for _ in range(3):
        with log.open("w") as output:
            process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while not written() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        with contextlib.suppress(ProcessLookupError):  # it may have finished
            os.killpg(process.pid, signal.SIGKILL)
        if process.wait() != 0:  # killed, not finished
            assert written(), f"killed before any output: {log.read_text()[-3000:]}"
            return
    raise AssertionError("the job finished every time before it could be killed")


def _rerun(command: list[str], log: Path) -> None:
    with log.open("w") as output:
        done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, timeout=300)
    assert done.returncode == 0, log.read_text()[-4000:]


def test_killed_preprocessing_keeps_the_last_output_and_a_rerun_writes_it_again(
    synthetic_archive: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    work = tmp_path / ".out.work"
    args = ["--metadata", str(synthetic_archive / "metadata.csv"), "--output_dir", str(out)]
    preprocess.run([*args, *LOCAL_RUNNER])  # uninterrupted (output is runner-independent)
    uninterrupted = _files(out)

    command = [sys.executable, "-m", "beam_pipelines.preprocess", *args, *MULTI_PROCESS]
    _kill_once_written(
        command,
        written=lambda: any(work.glob("*/part-*.tfrecord.gz")),
        log=tmp_path / "killed.log",
    )
    _assert_same_files(_files(out), uninterrupted)  # the last good output, untouched
    assert work.is_dir()
    # A kill inside an atomic write leaves its temporary file: one more to clean up.
    (work / "manifest.json.tmp-0123456789abcdef").write_text("{")

    _rerun(command, tmp_path / "rerun.log")
    _assert_same_files(_files(out), uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".out.lock",
        "killed.log",
        "logs",  # the job's own log, beside its output
        "out",
        "rerun.log",
    ]


def test_killed_scoring_keeps_the_last_output_and_a_rerun_writes_it_again(
    synthetic_archive: Path, trained_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores"
    prefix = out / "archive"
    work = out / ".archive.work"
    args = [
        "--model",
        str(trained_model / "model"),
        "--metadata",
        str(synthetic_archive / "metadata.csv"),
        "--output",
        str(prefix),
        "--num_shards",
        "3",
    ]
    score.run([*args, *LOCAL_RUNNER])  # uninterrupted
    uninterrupted = _files(out)
    assert len([n for n in uninterrupted if n.endswith(".parquet")]) == 3

    command = [sys.executable, "-m", "beam_pipelines.score", *args, *MULTI_PROCESS]
    _kill_once_written(
        command,
        written=lambda: any(p.suffix == ".parquet" for p in work.rglob("*")),
        log=tmp_path / "killed.log",
    )
    assert {k: v for k, v in _files(out).items() if not k.startswith(".archive.work")} == (
        uninterrupted
    )
    (work / "archive-00001-of-00003.parquet.tmp-0123456789abcdef").write_bytes(b"PAR1")

    _rerun(command, tmp_path / "rerun.log")
    _assert_same_files(_files(out), uninterrupted)


def _buggy_decoder(monkeypatch: pytest.MonkeyPatch, victim: str) -> None:
    """Makes the shared decoder raise a non-reject error on one file."""
    real = dicom.decode_model_input

    def decode(source: Any, *args: Any, **kwargs: Any) -> Any:
        if str(source).endswith(victim):
            raise RuntimeError(f"decoder bug at PatientName '{PHI}'")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(dicom, "decode_model_input", decode)


def _victim(archive: Path) -> tuple[int, str]:
    with (archive / "metadata.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    number, row = next((i, r) for i, r in enumerate(rows, 1) if r["DicomPath"].startswith("raw/P"))
    return number, row["DicomPath"]


def _check_internal_error(
    rejects: list[dict], row: int, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    (record,) = [r for r in rejects if r["reason"] == "internal_error"]
    assert (record["row"], record["dicom_path"], record["stage"]) == (row, path, "decode")
    assert record["detail"].startswith("RuntimeError: decoder bug at PatientName")
    assert PHI not in record["detail"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    logged = [m for m in warnings if "internal_error" in m]
    assert len(logged) == 1 and f"row {row}," in logged[0] and "Traceback" not in logged[0]
    assert "decode_model_input" in logged[0]  # the frames: where the bug is
    assert PHI not in logged[0] and path not in logged[0] and path.split("/")[1] not in logged[0]


def test_unexpected_decoder_error_rejects_one_row_in_preprocessing(
    synthetic_archive: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    row, path = _victim(synthetic_archive)
    _buggy_decoder(monkeypatch, path)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        manifest = preprocess.run(
            [
                "--metadata",
                str(synthetic_archive / "metadata.csv"),
                "--output_dir",
                str(out),
                "--direct_num_workers=1",
                *LOCAL_RUNNER,
            ]
        )
    rejects = [json.loads(x) for x in (out / "rejects" / "rejects.jsonl").read_text().splitlines()]
    _check_internal_error(rejects, row, path, caplog)
    assert manifest["rejected_by_reason"]["internal_error"] == 1
    assert manifest["kept"] + manifest["rejected"] == manifest["input_rows"]
    with (synthetic_archive / "expected_rejects.csv").open() as handle:
        assert manifest["rejected"] == sum(1 for _ in csv.DictReader(handle)) + 1


def test_unexpected_decoder_error_rejects_one_row_in_scoring(
    synthetic_archive: Path,
    trained_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    row, path = _victim(synthetic_archive)
    _buggy_decoder(monkeypatch, path)
    prefix = tmp_path / "archive"
    with caplog.at_level(logging.WARNING):
        summary = score.run(
            [
                "--model",
                str(trained_model / "model"),
                "--metadata",
                str(synthetic_archive / "metadata.csv"),
                "--output",
                str(prefix),
                "--direct_num_workers=1",
                *LOCAL_RUNNER,
            ]
        )
    rejects = [
        json.loads(x) for x in (tmp_path / "rejects" / "archive.jsonl").read_text().splitlines()
    ]
    _check_internal_error(rejects, row, path, caplog)
    assert summary["rejected_by_reason"]["internal_error"] == 1
    assert summary["scored"] + summary["rejected"] == summary["inputs"]


def test_memory_error_and_interrupts_still_propagate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from beam_pipelines.transforms.rows import ValidRow

    row = ValidRow(1, "P1", "S1", "a.dcm", str(tmp_path / "a.dcm"), "PA", True, 40, "F", {})
    from beam_pipelines.transforms.decode import DecodeAndStageFn, DecodeForScoringFn

    preprocess_fn = DecodeAndStageFn(dicom.DecodeOptions(), "pad", str(tmp_path), 0)
    score_fn = DecodeForScoringFn(dicom.DecodeOptions(), "pad")
    for error in (MemoryError, KeyboardInterrupt):

        def fail(*args: object, error: type[BaseException] = error, **kwargs: object) -> None:
            raise error

        monkeypatch.setattr(dicom, "decode_model_input", fail)
        for fn, element in (
            (preprocess_fn, (row, {"P1": "train"}, {"train": 1})),
            (score_fn, (row,)),
        ):
            fn.setup()
            with pytest.raises(error):
                list(fn.process(*element))
