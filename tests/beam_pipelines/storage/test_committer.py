"""Transactional outputs: private work folder, one-step commit, listed deletes only, the lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beam_pipelines.storage import committer, files
from beam_pipelines.storage.committer import OutputRefused, OutputTarget, OutputTransaction
from beam_pipelines.storage.output_lock import OutputLock, OutputLocked


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _run(out: Path, files: dict[str, str], job: str = "job", **options: object) -> list[str]:
    with OutputTransaction(OutputTarget.at(str(out), folder=True), job, **options) as tx:
        _write(Path(tx.job_path), files)
        return tx.commit(last="manifest.json" if "manifest.json" in files else None)


@pytest.mark.parametrize("atomic_swap", [True, False], ids=["swap", "file_by_file"])
def test_commit_replaces_the_output_and_deletes_only_listed_files(
    tmp_path: Path, atomic_swap: bool
) -> None:
    out = tmp_path / "out"
    first = {"a/part-0": "1", "a/part-1": "1", "manifest.json": "{1}"}
    assert _run(out, first, atomic_swap=atomic_swap) == ["a/part-0", "a/part-1", "manifest.json"]
    record = json.loads((out / "commit.json").read_text())
    assert record == {"job": "job", "files": ["a/part-0", "a/part-1", "manifest.json"]}

    _run(out, {"a/part-0": "2", "manifest.json": "{2}"}, atomic_swap=atomic_swap)
    assert _tree(out) == {
        "a/part-0": b"2",
        "commit.json": (out / "commit.json").read_bytes(),
        "manifest.json": b"{2}",
    }
    # Nothing of the run is left beside the output but its lock.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_a_failed_run_leaves_the_previous_output_and_no_work_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(out, {"part-0": "good", "manifest.json": "{}"})
    before = _tree(out)
    with (
        pytest.raises(RuntimeError, match="disk full"),
        OutputTransaction(OutputTarget.at(str(out), True), "job") as tx,
    ):
        _write(Path(tx.job_path), {"part-0": "half"})
        raise RuntimeError("disk full")
    assert _tree(out) == before
    assert not (tmp_path / ".out.work").exists()


def test_a_killed_runs_work_folder_is_removed_by_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(out, {"part-0": "good"})
    work = tmp_path / ".out.work"
    _write(work, {".work.json": "{}", "part-0": "partial", ".staging/x": "chunk"})
    _run(out, {"part-0": "new"})
    assert (out / "part-0").read_text() == "new"
    assert not work.exists()


def test_a_kill_after_the_swap_leaves_the_old_output_whose_listed_files_go(
    tmp_path: Path,
) -> None:
    """The swapped-out previous output sits in the work folder; only its listed files go."""
    out = tmp_path / "out"
    _run(out, {"part-0": "new"})
    work = tmp_path / ".out.work"
    _write(work, {"part-0": "old", "commit.json": json.dumps({"job": "job", "files": ["part-0"]})})
    _write(work, {"notes.txt": "someone's"})  # added by hand: never deleted
    _run(out, {"part-0": "newer"})
    assert not work.exists()
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.kept-")]
    assert _tree(kept) == {"notes.txt": b"someone's"}


def test_without_an_atomic_exchange_a_kill_between_the_renames_is_repaired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "exchange", lambda first, second: False)
    out = tmp_path / "out"
    _run(out, {"part-0": "1"})
    _run(out, {"part-0": "2"})  # the two-rename fallback
    assert (out / "part-0").read_text() == "2"
    assert not (tmp_path / ".out.previous").exists()
    out.rename(tmp_path / ".out.previous")  # as if killed between the two renames
    with OutputTransaction(OutputTarget.at(str(out), True), "job"):
        assert (out / "part-0").read_text() == "2"  # restored before any work


def test_a_folder_with_files_no_run_wrote_is_refused_and_untouched(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    _write(archive, {"train/part-1.dcm": "DICM", "metadata.csv": "PatientID"})
    before = _tree(archive)
    with pytest.raises(OutputRefused, match=r"files no run of job listed \(metadata.csv"):
        _run(archive, {"part-0": "x"})
    assert _tree(archive) == before
    _run(tmp_path / "out", {"part-0": "x"})
    (tmp_path / "out" / "mine.txt").write_text("added later")
    with pytest.raises(OutputRefused, match="mine.txt"):
        _run(tmp_path / "out", {"part-0": "y"})
    assert (tmp_path / "out" / "part-0").read_text() == "x"


def test_inputs_inside_the_output_and_outputs_inside_outputs_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(out, {"splits.csv": "PatientID,split"}, job="xray-preprocess")
    with pytest.raises(OutputRefused, match="lies inside the output"):
        _run(out, {"x": "1"}, job="xray-preprocess", inputs=(str(out / "splits.csv"),))
    with pytest.raises(OutputRefused, match="an output of xray-preprocess"):
        _run(out / "results", {"x": "1"}, job="xray-train")
    with pytest.raises(OutputRefused, match="is an output of xray-preprocess, not of xray-train"):
        _run(out, {"x": "1"}, job="xray-train")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputRefused, match="is a file"):
        _run(tmp_path / "file", {"x": "1"})


def test_glob_characters_in_the_output_name_touch_no_neighbour(tmp_path: Path) -> None:
    _run(tmp_path / "runA", {"part-0": "A"})
    _run(tmp_path / "run?", {"part-0": "1"})
    _run(tmp_path / "run?", {"part-1": "2"})
    assert _tree(tmp_path / "runA")["part-0"] == b"A"
    assert sorted(_tree(tmp_path / "run?")) == ["commit.json", "part-1"]


def _prefix_run(prefix: Path, files: dict[str, str]) -> None:
    with OutputTransaction(OutputTarget.at(str(prefix), folder=False), "xray-score") as tx:
        _write(Path(tx.work), files)
        tx.commit(last=f"{prefix.name}.summary.json")


def test_prefix_outputs_commit_file_by_file_and_leave_their_neighbours(tmp_path: Path) -> None:
    neighbours = {"keep-00000-of-00001.parquet": "keep", "rejects/keep.jsonl": "k"}
    _write(tmp_path, neighbours)
    prefix = tmp_path / "k?ep"
    _prefix_run(
        prefix,
        {
            "k?ep-00000-of-00002.parquet": "1",
            "k?ep-00001-of-00002.parquet": "1",
            "k?ep.summary.json": "{}",
            "rejects/k?ep.jsonl": "",
        },
    )
    _prefix_run(prefix, {"k?ep-00000-of-00001.parquet": "2", "k?ep.summary.json": "{2}"})
    tree = _tree(tmp_path)
    assert {k: tree[k] for k in neighbours} == {k: v.encode() for k, v in neighbours.items()}
    assert sorted(tree) == [
        "k?ep-00000-of-00001.parquet",
        "k?ep.commit.json",
        "k?ep.summary.json",
        "keep-00000-of-00001.parquet",
        "rejects/keep.jsonl",
    ]


def test_a_prefix_commit_cut_by_a_kill_is_completed_by_the_next_run(tmp_path: Path) -> None:
    prefix = tmp_path / "p"
    _prefix_run(prefix, {"p-00000-of-00002.parquet": "1", "p-00001-of-00002.parquet": "1"})
    # A commit that moved one of its two files before the kill.
    work = tmp_path / ".p.work"
    files = ["p-00000-of-00001.parquet", "p.summary.json"]
    _write(
        work,
        {
            "p.summary.json": "{2}",
            "p.commit.json": json.dumps({"job": "xray-score", "files": files}),
        },
    )
    (tmp_path / "p-00000-of-00001.parquet").write_text("2")
    with OutputTransaction(OutputTarget.at(str(prefix), folder=False), "xray-score"):
        assert sorted(_tree(tmp_path)) == [
            ".p.work/.work.json",
            "p-00000-of-00001.parquet",
            "p.commit.json",
            "p.summary.json",
        ]


def test_a_prefix_commit_never_replaces_a_file_no_run_wrote(tmp_path: Path) -> None:
    (tmp_path / "p.summary.json").write_text("someone else's")
    (tmp_path / "p-00000-of-00001.parquet").write_text("an older version's")
    with pytest.raises(OutputRefused, match=r"no run of xray-score listed \(p-00000-of-00001"):
        OutputTransaction(OutputTarget.at(str(tmp_path / "p"), folder=False), "xray-score").open()
    assert not (tmp_path / ".p.work").exists()  # refused before any work
    assert (tmp_path / "p.summary.json").read_text() == "someone else's"


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    lock = tmp_path / ".out.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from beam_pipelines.storage.output_lock import OutputLock; "
            f"held = OutputLock({str(lock)!r}); held.acquire(); print('held', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(OutputLocked, match=f"pid {holder.pid}, started "):
            OutputLock(str(lock)).acquire()
        with (
            pytest.raises(OutputLocked),
            OutputTransaction(OutputTarget.at(str(tmp_path / "out"), True), "job"),
        ):
            pass
        assert not (tmp_path / "out").exists() and not (tmp_path / ".out.work").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 5
    taken = OutputLock(str(lock))
    while True:  # the kernel drops a dead holder's lock at once
        try:
            taken.acquire()
            break
        except OutputLocked:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert f'"pid": {os.getpid()}' in lock.read_text()
    taken.release()


def test_a_failure_inside_a_file_by_file_commit_is_completed_by_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = tmp_path / "p"
    _prefix_run(prefix, {"p-00000-of-00002.parquet": "1", "p-00001-of-00002.parquet": "1"})
    real_move, moved = files.move, []

    def failing_move(source: str, target: str) -> None:
        if moved:
            raise OSError(5, "Input/output error")
        moved.append(source)
        real_move(source, target)

    monkeypatch.setattr(files, "move", failing_move)
    with pytest.raises(OSError, match="Input/output"):
        _prefix_run(prefix, {"p-00000-of-00001.parquet": "2", "p.summary.json": "{2}"})
    assert (tmp_path / ".p.work" / "p.commit.json").exists()  # the redo log stays
    monkeypatch.setattr(files, "move", real_move)
    with OutputTransaction(OutputTarget.at(str(prefix), folder=False), "xray-score"):
        pass
    assert sorted(_tree(tmp_path)) == [
        "p-00000-of-00001.parquet",
        "p.commit.json",
        "p.summary.json",
    ]


def test_a_kill_before_the_record_moves_in_leaves_no_stale_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = tmp_path / "p"
    _prefix_run(prefix, {"p-00000-of-00002.parquet": "1", "p-00001-of-00002.parquet": "1"})
    real_move = files.move

    def killed_at_the_record(source: str, target: str) -> None:
        if source.endswith(".commit.json"):
            raise KeyboardInterrupt
        real_move(source, target)

    monkeypatch.setattr(files, "move", killed_at_the_record)
    with pytest.raises(KeyboardInterrupt):
        _prefix_run(prefix, {"p-00000-of-00001.parquet": "2"})
    monkeypatch.setattr(files, "move", real_move)
    with OutputTransaction(OutputTarget.at(str(prefix), folder=False), "xray-score"):
        pass
    assert sorted(_tree(tmp_path)) == ["p-00000-of-00001.parquet", "p.commit.json"]


def test_a_failure_after_the_swap_still_counts_as_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _run(out, {"part-0": "old"})

    def broken_discard(self: OutputTransaction, folder: str) -> None:
        raise OSError(116, "Stale file handle")

    monkeypatch.setattr(OutputTransaction, "_discard", broken_discard)
    _run(out, {"part-0": "new"})  # no error: the swap was the commit
    assert (out / "part-0").read_text() == "new"
    assert (tmp_path / ".out.work" / "part-0").read_text() == "old"  # left to the next run
    monkeypatch.undo()
    _run(out, {"part-0": "newer"})
    assert not (tmp_path / ".out.work").exists()


def test_a_failed_second_rename_puts_the_previous_output_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "exchange", lambda first, second: False)
    out = tmp_path / "out"
    _run(out, {"part-0": "old"})
    real_rename = os.rename

    def interrupted(source: str, target: str) -> None:
        if source.endswith(".out.work"):
            raise KeyboardInterrupt
        real_rename(source, target)

    monkeypatch.setattr(committer.os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(out, {"part-0": "new"})
    monkeypatch.setattr(committer.os, "rename", real_rename)
    assert (out / "part-0").read_text() == "old"
    assert not (tmp_path / ".out.previous").exists()


def test_a_symlinked_output_is_written_through_to_its_target(tmp_path: Path) -> None:
    (tmp_path / "disk").mkdir()
    (tmp_path / "home").mkdir()
    _run(tmp_path / "disk" / "results", {"part-0": "1"})
    (tmp_path / "home" / "results").symlink_to(tmp_path / "disk" / "results")
    _run(tmp_path / "home" / "results", {"part-0": "2"})
    assert (tmp_path / "home" / "results").is_symlink()
    assert (tmp_path / "disk" / "results" / "part-0").read_text() == "2"
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["results"]  # no lock here


def test_leftovers_of_a_kill_while_starting_are_cleared_and_odd_ones_refused(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    work = tmp_path / ".out.work"
    _write(work, {".work.json.tmp-123": "{"})  # killed while writing its marker
    _run(out, {"part-0": "1"})
    assert not work.exists()
    work.write_text("a file in the way")
    with pytest.raises(OutputRefused, match="is in the way"):
        _run(out, {"part-0": "2"})


def test_a_resumable_run_keeps_its_work_folder_on_failure(tmp_path: Path) -> None:
    target = OutputTarget.at(str(tmp_path / "results"), True)
    with pytest.raises(RuntimeError), OutputTransaction(target, "xray-train", resume=True) as tx:
        _write(Path(tx.job_path), {"backup/latest.weights.h5": "epoch 3"})
        raise RuntimeError("out of memory at epoch 4")
    with OutputTransaction(target, "xray-train", resume=True) as tx:
        assert (Path(tx.job_path) / "backup" / "latest.weights.h5").read_text() == "epoch 3"


def test_a_mount_point_as_output_is_refused(tmp_path: Path) -> None:
    import shutil

    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tmpfs")
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(OutputRefused, match="is a mount point"):
            _run(mount, {"part-0": "1"})
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
