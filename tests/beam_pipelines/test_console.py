"""A job's terminal: the log file beside the output, one progress bar, everything on request."""

from __future__ import annotations

import csv
import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from beam_pipelines import console
from tests.support.data import REPO
from tests.support.runners import LOCAL_RUNNER


def test_the_output_location_comes_from_the_output_flag() -> None:
    assert console.output_location(["--output_dir", "/x/results/"]) == ("/x", "results")
    assert console.output_location(["--output=/x/scores/archive"]) == ("/x/scores", "archive")
    assert console.output_location(["--output", "gs://b/scores"]) is None
    assert console.output_location(["--output_dir", "/"]) is None
    assert console.output_location(["--model", "m"]) is None


def test_a_jobs_warning_relayed_from_a_worker_reaches_the_terminal() -> None:
    relayed = (
        'Worker: severity: WARN timestamp {   seconds: 1 } message: "Shard s is corrupt after 3 '
        'records: \\"x\\"" log_location: "/repo/beam_pipelines/transforms/scoring.py:80" '
        'thread: "MainThread"'
    )
    beam_own = relayed.replace("/repo/beam_pipelines/transforms/scoring.py", "/x/apache_beam/a.py")
    name = "apache_beam.runners.portability.local_job_service"

    def record(message: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord(name, level, "f", 1, message, (), None)

    keep = console._OwnWarnings()
    assert keep.filter(record(relayed))
    assert not keep.filter(record(beam_own))  # Beam's own chatter stays in the log
    assert not keep.filter(record(relayed, logging.INFO))
    shown = console._AboveTheBar(io.StringIO())
    shown.setFormatter(logging.Formatter("job: %(levelname)s %(message)s"))
    assert shown.format(record(relayed)) == (
        'job: WARNING Shard s is corrupt after 3 records: \\"x\\"'
    )


def test_workers_counts_add_up_for_the_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(console.PROGRESS_ENV, str(tmp_path))
    console.count("a", 3)
    console.count("b", 4)
    console.count("a", 5)  # a worker's later count replaces its earlier one
    console.announce_total(20)
    assert console._read(str(tmp_path)) == (9, 20)


def test_progress_of_a_new_instance_never_overwrites_an_earlier_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from beam_pipelines.transforms.outcomes import Progress

    monkeypatch.setenv(console.PROGRESS_ENV, str(tmp_path))
    for ticks in (100, 5):  # the second may reuse the first's address
        progress = Progress("decoded")
        for _ in range(ticks):
            progress.tick()
        progress.flush()
        del progress
    assert console._read(str(tmp_path)) == (105, None)


def test_without_a_progress_folder_counting_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(console.PROGRESS_ENV, raising=False)
    console.count("a", 3)  # no error, no file anywhere
    assert list(tmp_path.iterdir()) == []


def _preprocess(archive: Path, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    script = "from beam_pipelines.entry_points import preprocess; preprocess()"
    return subprocess.run(
        [sys.executable, "-c", script, "--metadata", str(archive / "metadata.csv")]
        + ["--output_dir", str(out), *flags, *LOCAL_RUNNER],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )


@pytest.mark.slow
def test_a_run_is_quiet_its_log_holds_everything_and_verbose_shows_it_live(
    synthetic_archive: Path, tmp_path: Path
) -> None:
    with (synthetic_archive / "metadata.csv").open(newline="") as handle:
        rows = sum(1 for _ in csv.DictReader(handle))
    done = _preprocess(synthetic_archive, tmp_path / "pre")
    assert done.returncode == 0, done.stderr[-3000:]
    terminal = done.stdout + done.stderr
    lines = terminal.replace("\r", "\n").splitlines()
    log = tmp_path / "logs" / "xray-preprocess.log"
    assert f"xray-preprocess: log: {log}" in lines  # named once
    assert sum(": log: " in line for line in lines) == 1
    assert len(terminal.splitlines()) <= 30
    assert "INFO" not in terminal and "WARNING" not in terminal, terminal[-2000:]
    assert f"/{rows} " in terminal  # the bar knows the total (images done / rows)
    assert done.stdout.startswith("xray-preprocess: ") and " kept " in done.stdout
    text = log.read_text()
    assert "INFO apache_beam" in text and "Preprocessed" in text  # Beam's and the job's lines

    # Refused before any work (inside another job's output): one line, nothing left behind.
    refused = _preprocess(synthetic_archive, tmp_path / "pre" / "inside")
    assert refused.returncode == 2
    assert [line for line in refused.stderr.splitlines() if line.strip()] == [
        line for line in refused.stderr.splitlines() if ": error: " in line
    ]
    assert not (tmp_path / "pre" / "logs").exists()
    assert log.read_text().count("==== xray-preprocess") == 1

    verbose = _preprocess(synthetic_archive, tmp_path / "pre2", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "INFO" in verbose.stderr and ": log: " not in verbose.stderr
