"""A job's terminal: quiet by default, everything in a log file, one progress bar.

Started by the entry points (:func:`beam_pipelines.cli.main`), never at
import. Without ``--verbose`` the job's own warnings and its one-line summary
reach the terminal; everything else (Beam's worker relays, TensorFlow's C++
messages, absl, Keras and Python warnings, every INFO line) goes to
``<the output's folder>/logs/<job>.log``, appended run after run, its path
printed once. The log lives beside the output, not inside it: a failed run's
log survives, and committed outputs stay byte-identical between runs. The
file descriptor 2 itself is redirected, so worker processes and C++ code
write there too.

Progress: workers count what they did into small files of a folder named by
``XRAY_PROGRESS_DIR`` (:func:`count`); the driver sums them twice a second
into a ``tqdm`` bar (images done, rate, ETA once the job announced its total
with :func:`announce_total`). Workers of a remote cluster do not see the
folder, so there the bar stays at zero and the log says so.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any

PROGRESS_ENV = "XRAY_PROGRESS_DIR"
_TOTAL_FILE = "total"
_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
#: Loggers whose warnings a user should see live; everything else only goes to the log.
_OWN_LOGGERS = ("beam_pipelines", "trainer", "analysis", "archive_tools", "explain", "__main__")
_OUTPUT_FLAGS = ("--output_dir", "--output")


def log_path(prog: str, argv: list[str]) -> str | None:
    """``<folder of the output>/logs/<prog>.log`` for a local output flag, else None."""
    for index, arg in enumerate(argv):
        for flag in _OUTPUT_FLAGS:
            if arg == flag and index + 1 < len(argv):
                value = argv[index + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            if "://" in value and not value.startswith("file://"):
                return None
            value = value.removeprefix("file://").rstrip("/") or "."
            parent = os.path.dirname(os.path.abspath(value))
            return os.path.join(parent, "logs", f"{prog}.log")
    return None


def count(key: str, done: int) -> None:
    """Records that a worker's ``key`` (one per process and stage) has done ``done`` items."""
    folder = os.environ.get(PROGRESS_ENV)
    if not folder or not os.path.isdir(folder):
        return
    path = os.path.join(folder, f"{os.getpid()}-{key}")
    with contextlib.suppress(OSError):
        with open(f"{path}.tmp", "w") as handle:
            handle.write(str(done))
        os.replace(f"{path}.tmp", path)


def announce_total(total: int) -> None:
    """The driver's expected item count for the bar (images to decode, shards' records...)."""
    count(_TOTAL_FILE, total)


def announce_total_later(total: Callable[[], int | None]) -> None:
    """Computes the total in a background thread (e.g. counting metadata rows) when a bar shows."""
    if not os.environ.get(PROGRESS_ENV):
        return

    def work() -> None:
        with contextlib.suppress(Exception):  # the bar goes without a total, nothing else
            value = total()
            if value is not None:
                announce_total(value)

    threading.Thread(target=work, name="progress-total", daemon=True).start()


def _read(folder: str) -> tuple[int, int | None]:
    done, total = 0, None
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.endswith(".tmp"):
                continue
            with contextlib.suppress(OSError, ValueError), open(os.path.join(folder, name)) as f:
                value = int(f.read() or 0)
                if name.endswith(f"-{_TOTAL_FILE}"):
                    total = value
                else:
                    done += value
    return done, total


class _OwnWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and record.name.startswith(_OWN_LOGGERS)


class Console:
    """Sets up a job's terminal for the run (a context manager); ``verbose`` shows everything."""

    def __init__(self, prog: str, argv: list[str], verbose: bool, unit: str = "img") -> None:
        self.prog, self.verbose, self.unit = prog, verbose, unit
        self.log = None if verbose else log_path(prog, argv)
        self._saved: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._folder: str | None = None
        self.terminal: IO[str] = sys.stderr

    def __enter__(self) -> Console:
        root = logging.getLogger()
        held = [h for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler)]
        logging.basicConfig(level=logging.INFO, format=_FORMAT, force=True)
        if self.log is not None:
            try:
                self._quiet(self.log)
            except OSError as exc:  # e.g. a read-only parent: stay live rather than fail
                logging.getLogger(__name__).warning("no log file (%s): logging live", exc)
                self.log = None
        for memory in held:  # what the job's imports logged (beam_pipelines.entry_points)
            memory.setTarget(root.handlers[0])
            memory.close()
        self._start_progress()
        return self

    def _quiet(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle = open(path, "a", buffering=1)  # noqa: SIM115 (open for the run, closed on exit)
        handle.write(f"==== {self.prog} pid {os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        terminal = os.fdopen(os.dup(2), "w", buffering=1)
        sys.stderr.flush()
        self._saved = {"fd": os.dup(2), "stderr": sys.stderr, "handle": handle}
        os.dup2(handle.fileno(), 2)  # C++ messages and worker processes write here too
        sys.stderr = self.terminal = terminal
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        to_file = logging.StreamHandler(handle)
        to_file.setFormatter(logging.Formatter(_FORMAT))
        to_terminal = logging.StreamHandler(terminal)
        to_terminal.setFormatter(logging.Formatter(f"{self.prog}: %(levelname)s %(message)s"))
        to_terminal.addFilter(_OwnWarnings())
        root.addHandler(to_file)
        root.addHandler(to_terminal)
        logging.captureWarnings(True)
        # A full disk must not turn every later log call into a traceback on the terminal.
        logging.raiseExceptions = False
        print(f"{self.prog}: log: {path}", file=terminal)

    def _start_progress(self) -> None:
        self._folder = tempfile.mkdtemp(prefix="xray-progress-")
        self._saved["env"] = os.environ.get(PROGRESS_ENV)
        os.environ[PROGRESS_ENV] = self._folder
        if self.verbose:
            return  # the live log is the progress
        self._thread = threading.Thread(target=self._render, name="progress", daemon=True)
        self._thread.start()

    def _render(self) -> None:
        from tqdm import tqdm

        assert self._folder is not None
        bar = None
        while True:
            stopping = self._stop.wait(0.5)
            done, total = _read(self._folder)
            if bar is None and (done or total):
                # A log or a pipe gets a line every 30 s, not a redraw every 0.5 s.
                every = 0.5 if self.terminal.isatty() else 30.0
                bar = tqdm(
                    total=total,
                    unit=self.unit,
                    file=self.terminal,
                    dynamic_ncols=True,
                    mininterval=every,
                )
            if bar is not None:
                if total is not None and bar.total != total:
                    bar.total = total
                bar.update(done - bar.n)
            if stopping:
                if bar is not None:
                    bar.close()
                return

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        if self._saved.get("env") is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = self._saved["env"]
        if "fd" in self._saved:
            sys.stderr.flush()
            os.dup2(self._saved["fd"], 2)
            os.close(self._saved["fd"])
            self._saved["handle"].flush()
            logging.captureWarnings(False)
