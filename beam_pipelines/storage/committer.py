"""Transactional job outputs: work in private, commit in one step, delete only what was listed.

Every job (preprocess, score, train, analyze) writes through an
:class:`OutputTransaction` (the output-committer idea of Hadoop and Spark, for
a whole job):

- The run holds the output's lock (:mod:`beam_pipelines.storage.output_lock`) from
  before any work until after the commit.
- It writes everything into its own work folder ``<parent>/.<name>.work``,
  never into the output itself.
- On success the work folder gets a commit record, ``commit.json`` (the job
  and every file it wrote), and replaces the output. A folder output on a
  local or POSIX filesystem is swapped in one step (``renameat2`` with
  ``RENAME_EXCHANGE``; where the kernel or filesystem lacks it, two renames
  with the previous output parked at ``<parent>/.<name>.previous``, restored
  by the next run if a kill falls between them). Then the files the previous
  output's own record lists are deleted, and nothing else.
- Files of a prefix output (scoring's ``PREFIX-*.parquet``) and outputs on
  object stores are committed file by file: each file is renamed into place,
  the job's summary and the record last, then the previous record's files
  that the new run did not rewrite are deleted. A kill during these renames
  is completed by the next run (the record in the work folder says what the
  commit was), so readers never keep a mix.

A run that fails leaves the previous output as it was and removes its work
folder; a killed run's work folder is removed by the next run. An output
location that holds files no run of the job listed (an archive, someone's
notes), or that lies inside another job's output, is refused.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from beam_pipelines.storage import files as storage
from beam_pipelines.storage.files import files_below, is_local, local_path, remove_tree
from beam_pipelines.storage.output_lock import OutputLock, OutputLocked
from beam_pipelines.storage.output_target import RECORD, OutputRefused, OutputTarget, join_path

logger = logging.getLogger(__name__)

_MARKER = ".work.json"


def _ancestors(path: str) -> Iterator[str]:
    """The folders that contain path, nearest first."""
    if is_local(path):
        current = os.path.abspath(local_path(path))
        while True:
            parent = os.path.dirname(current)
            if parent == current:
                return
            yield parent
            current = parent
    scheme, rest = path.split("://", 1)
    parts = rest.rstrip("/").split("/")
    for end in range(len(parts) - 1, 0, -1):
        yield f"{scheme}://{'/'.join(parts[:end])}"


def _inside(path: str, folder: str) -> bool:
    if is_local(path) and is_local(folder):
        real, base = os.path.realpath(local_path(path)), os.path.realpath(local_path(folder))
        return real == base or real.startswith(base.rstrip("/") + "/")
    return path.rstrip("/").startswith(folder.rstrip("/") + "/")


# --------------------------------------------------------------------------


class OutputTransaction:
    """One run's output: locked, written in private, committed in one step.

    Use as a context manager around the job::

        with OutputTransaction(OutputTarget.at(out, folder=True), "xray-preprocess") as tx:
            write everything below tx.job_path
            tx.commit()

    Leaving the block without :meth:`commit` (an error, an empty run) removes
    the work folder (or keeps it readable with ``keep_work()``) and leaves
    the previous output untouched.
    """

    def __init__(
        self,
        target: OutputTarget,
        job: str,
        *,
        inputs: tuple[str, ...] = (),
        resume: bool = False,
        atomic_swap: bool = True,
    ) -> None:
        """
        Args:
            target: the output location.
            job: the job's name, recorded and checked (one job per output).
            inputs: files the job reads (metadata, models): refused inside the output.
            resume: keep a killed run's work folder for the job to resume from.
            atomic_swap: swap folder outputs in one rename where supported
                (False forces the file-by-file commit, as on object stores).
        """
        self.target = target
        self.job = job
        self._inputs = inputs
        self._resume = resume
        self._file_by_file = not (target.folder and is_local(target.parent) and atomic_swap)
        self._lock = OutputLock(target.lock)
        self._opened = False
        self._commit_started = False  # the record is written: only the next run may clean up
        self._committed = False
        self._keep_work = False

    @property
    def job_path(self) -> str:
        """Where the job writes: the work folder (folder output) or the prefix inside it."""
        return self.target.job_path()

    @property
    def work(self) -> str:
        return self.target.work

    def __enter__(self) -> OutputTransaction:
        if not self._opened:
            self.open()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # A resumable job (training) keeps its work folder on any failure: the
        # next run resumes from its backup. Once the record is written, the
        # work folder is the commit's redo log: the next run completes it.
        keep = self._committed or self._keep_work or self._commit_started or self._resume
        try:
            if not keep:
                remove_tree(self.work)
        finally:
            self._lock.release()

    def open(self) -> None:
        """Checks the location, takes the lock, clears leftovers, creates the work folder.

        Raises:
            OutputRefused: the location cannot be used (one-line reason).
            OutputLocked: another run holds the lock.
        """
        self._check_location()
        parent = self.target.parent
        if is_local(parent):
            try:
                os.makedirs(local_path(parent), exist_ok=True)
            except OSError as exc:
                raise OutputRefused(f"cannot create {parent}: {exc.strerror}") from exc
        try:
            self._lock.acquire()
        except OutputLocked:
            raise
        except OSError as exc:
            raise OutputRefused(
                f"cannot write in {parent} (the output's lock and work folder go there): "
                f"{exc.strerror or exc}"
            ) from exc
        try:
            self._recover()
            self._check_current()
            self._start_work()
        except OSError as exc:
            self._lock.release()
            raise OutputRefused(f"cannot prepare the output: {exc}") from exc
        except BaseException:
            self._lock.release()
            raise
        self._opened = True

    def keep_work(self) -> str:
        """Keeps the uncommitted work folder for the user to read (until the next run)."""
        self._keep_work = True
        return self.work

    def commit_unless_empty(self, kept: int, what: str, rejects: str, last: str) -> None:
        """Commits, unless the run kept nothing: a run of rejects never replaces an output.

        Args:
            kept: rows kept or scored.
            what: the run's one-line account (counts, reasons).
            rejects: the rejects file, relative to the work folder.
            last: as for :meth:`commit`.

        Raises:
            EmptyRun: nothing was kept; the work folder stays readable until the next run.
        """
        from beam_pipelines.cli import EmptyRun

        if kept == 0:
            work = self.keep_work()
            raise EmptyRun(
                f"{what}; nothing committed, {self.target.path} is unchanged; this run's "
                f"rejects: {work}/{rejects}"
            )
        self.commit(last=last)

    def commit(self, last: str | None = None) -> list[str]:
        """Replaces the previous output with the work folder's files.

        Args:
            last: a file (relative to the output root) to move just before the
                record on a file-by-file commit: the job's manifest or summary.

        Returns:
            The committed files, relative to the output root.
        """
        files = [f for f in files_below(self.work) if f not in (_MARKER, self.target.record_name)]
        if last is not None and last in files:
            files = [f for f in files if f != last] + [last]
        storage.write_json(
            join_path(self.work, self.target.record_name), {"job": self.job, "files": files}
        )
        self._commit_started = True
        storage.delete([join_path(self.work, _MARKER)])
        if self._file_by_file:
            self._roll_forward()
            self._committed = True
        else:
            self._swap()  # sets _committed at the rename itself
        return files

    # ---------------------------------------------------------------- checks

    def _check_location(self) -> None:
        target = self.target
        if target.folder and is_local(target.path) and os.path.lexists(local_path(target.path)):
            out = local_path(target.path)
            if not os.path.isdir(out):
                raise OutputRefused(f"{target.path} is a file, not a folder")
            if (
                os.path.ismount(out)
                or os.stat(out).st_dev != os.stat(local_path(target.parent)).st_dev
            ):
                # Its work folder would live on the parent's filesystem: no rename between them.
                raise OutputRefused(
                    f"{target.path} is a mount point (or on another filesystem than its parent "
                    "folder): use a folder inside it"
                )
        for given in self._inputs if target.folder else ():
            if given and _inside(given, target.path):
                raise OutputRefused(f"{given} lies inside the output {target.path}: choose another")
        start = target.path if target.folder else join_path(target.parent, "x")
        for folder in _ancestors(start):
            record = storage.read_json(join_path(folder, RECORD))
            if record is not None and "job" in record:
                raise OutputRefused(
                    f"{target.path} lies inside {folder}, an output of {record['job']}: "
                    "choose a location outside it"
                )

    def _check_current(self) -> None:
        """Refuses an existing output this job did not write (or that grew foreign files)."""
        target = self.target
        record = storage.read_json(join_path(target.root, target.record_name))
        if record is not None and record.get("job") != self.job:
            raise OutputRefused(
                f"{target.path} is an output of {record.get('job')}, not of {self.job}"
            )
        listed = set(record["files"]) | {target.record_name} if record else set()
        if target.folder:
            found = files_below(target.path)
        else:  # a prefix's neighbours are not its files: only names this job writes
            found = [f for f in files_below(target.parent) if self._prefix_owns(f)]
        foreign = [f for f in found if f not in listed]
        if foreign:
            shown = ", ".join(foreign[:3]) + (
                f" and {len(foreign) - 3} more" if foreign[3:] else ""
            )
            raise OutputRefused(
                f"{target.path} holds files no run of {self.job} listed ({shown}); they are "
                "never deleted or replaced: move them away or choose another output"
            )

    def _prefix_owns(self, relative: str) -> bool:
        """True for the names a prefix output's files take (``name-…-of-….parquet``, …)."""
        name = self.target.name
        folder, base = posixpath.split(relative)
        if folder == "rejects":
            return base == f"{name}.jsonl"
        if folder:
            return False
        return base in (f"{name}.summary.json", self.target.record_name) or (
            base.startswith(f"{name}-") and base.endswith(".parquet") and "-of-" in base
        )

    # -------------------------------------------------------------- recovery

    def _recover(self) -> None:
        """Finishes or removes what a killed run left."""
        target = self.target
        if storage.exists(target.previous):  # a kill fell between the two renames of a swap
            if storage.exists(target.path):
                self._discard(target.previous)
            else:
                os.rename(local_path(target.previous), local_path(target.path))
                logger.warning("Restored the previous output of %s", target.path)
        if not storage.exists(target.work):
            return
        if is_local(target.work) and not os.path.isdir(local_path(target.work)):
            raise OutputRefused(
                f"{target.work} is in the way: it is not a work folder of {self.job}"
            )
        if storage.exists(join_path(target.work, target.record_name)):
            if self._file_by_file:
                logger.warning("Completing the commit a killed run began in %s", target.path)
                self._roll_forward()
            else:
                self._discard(target.work)
        elif any(f == _MARKER or f.startswith(f"{_MARKER}.tmp-") for f in files_below(target.work)):
            if not self._resume:
                logger.info("Removing what a killed run left in %s", target.work)
                remove_tree(target.work)
        elif files_below(target.work):
            raise OutputRefused(
                f"{target.work} is in the way: it is not a work folder of {self.job}"
            )
        else:
            remove_tree(target.work)

    def _start_work(self) -> None:
        marker = join_path(self.work, _MARKER)
        if storage.exists(marker):  # resuming
            return
        if is_local(self.work):
            os.makedirs(local_path(self.work), exist_ok=True)
        storage.write_json(marker, {"job": self.job, "pid": os.getpid(), "started": time.time()})

    # ---------------------------------------------------------------- commit

    def _swap(self) -> None:
        """Puts the work folder in the output's place; the commit point is the rename itself."""
        target = self.target
        work, out = local_path(target.work), local_path(target.path)
        if not os.path.lexists(out):
            os.rename(work, out)
            self._committed = True
            return
        if storage.exchange(work, out):
            self._committed = True
            replaced = target.work
        else:
            previous = local_path(target.previous)
            os.rename(out, previous)
            try:
                os.rename(work, out)
            except BaseException:
                os.rename(previous, out)  # the previous output is never left missing
                raise
            self._committed = True
            replaced = target.previous
        try:
            self._discard(replaced)
        except OSError as exc:  # committed: what is left is the next run's to remove
            logger.warning("Could not remove the replaced output in %s: %s", replaced, exc)

    def _discard(self, folder: str) -> None:
        """Deletes a replaced output's listed files; keeps (and names) anything else."""
        record = storage.read_json(join_path(folder, RECORD)) or {"files": []}
        storage.delete([join_path(folder, f) for f in [*record.get("files", []), RECORD, _MARKER]])
        storage.remove_empty_folders(folder)
        if os.path.lexists(local_path(folder)):
            stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            kept = join_path(self.target.parent, f".{self.target.name}.kept-{stamp}")
            os.rename(local_path(folder), local_path(kept))
            logger.warning("Files the previous output did not list were kept in %s", kept)

    def _roll_forward(self) -> None:
        """Moves the work folder's files into place, record last; then the old files go."""
        target = self.target
        record_path = join_path(target.work, target.record_name)
        record = storage.read_json(record_path)
        if record is None:
            raise OutputRefused(f"{record_path} is unreadable: remove {target.work} by hand")
        files: list[str] = list(record["files"])
        previous = storage.read_json(join_path(target.root, target.record_name))
        previous_files = set(previous["files"]) if previous else set()
        listed = [*files, target.record_name]
        pending = [f for f in listed if storage.exists(join_path(target.work, f))]
        foreign = [
            f
            for f in pending
            if f != target.record_name
            and f not in previous_files
            and storage.exists(join_path(target.root, f))
        ]
        if foreign:
            raise OutputRefused(
                f"{join_path(target.root, foreign[0])} exists and no run of {self.job} wrote it: "
                "it is never replaced; move it away or choose another output"
            )
        for name in pending:
            if name != target.record_name:
                storage.move(join_path(target.work, name), join_path(target.root, name))
        # Before the record moves in: a kill here is completed by the next run,
        # which still finds the old record and so still knows what it replaces.
        superseded = sorted(previous_files - set(files))
        storage.delete([join_path(target.root, f) for f in superseded])
        name = target.record_name
        storage.move(join_path(target.work, name), join_path(target.root, name))
        remove_tree(target.work)
        if is_local(target.root):
            for name in superseded:  # folders the old files leave empty
                emptied = local_path(join_path(target.root, name))
                _remove_empty_parents(emptied, local_path(target.root))


def _remove_empty_parents(path: str, root: str) -> None:
    """Removes the empty folders between a deleted file and root (root excluded)."""
    folder, stop = os.path.dirname(path), os.path.normpath(root)
    while folder and os.path.normpath(folder) != stop and folder != os.path.dirname(folder):
        try:
            os.rmdir(folder)
        except OSError:
            return
        folder = os.path.dirname(folder)


def read_record(target: OutputTarget) -> dict[str, Any] | None:
    """The committed output's record (job, files), or None when there is none."""
    return storage.read_json(join_path(target.root, target.record_name))


def open_output(
    flag: str, path: str, job: str, *, folder: bool = True, **options: Any
) -> OutputTransaction:
    """Opens a job's output transaction; a refused or locked output stops the job (exit 2)."""
    from beam_pipelines.cli import refuse

    try:
        transaction = OutputTransaction(OutputTarget.at(path, folder), job, **options)
        transaction.open()
    except (OutputRefused, OutputLocked) as exc:
        refuse(job, f"{flag} {path}: {exc}")
    return transaction
