"""A job's terminal: quiet by default, everything in a log file, one progress bar.

Started by the entry points (:func:`beam_pipelines.cli.main`), never at
import. Without ``--verbose`` the job's own warnings and its one-line summary
reach the terminal; everything else (Beam's worker relays, TensorFlow's C++
messages, absl, Keras and Python warnings, every INFO line, a failure's
traceback) goes to the log: a temporary file until the committer accepts the
output, then ``<the output's folder>/logs/<job>.log``, appended run after run,
its path printed once. The log lives beside the output, not inside it: a
failed run's log survives, committed outputs stay byte-identical between
runs, and a refused run leaves nothing behind. The file descriptor 2 itself
is redirected, so worker processes and C++ code write there too.

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
import re
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


def output_location(argv: list[str]) -> tuple[str, str] | None:
    """(folder that holds the output, the output's name) from a local output flag, else None."""
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
            path = os.path.abspath(value.removeprefix("file://") or ".")
            if path == os.path.dirname(path):
                return None  # "/" is no output
            return os.path.dirname(path), os.path.basename(path)
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
    """Computes the total in a background thread (e.g. matching a glob) when a bar shows."""
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


# How the local runner relays a worker's log record to the driver (one line).
_RELAYED_FROM = re.compile(r'log_location: "[^"]*/(?:' + "|".join(_OWN_LOGGERS) + r')/[^"]*"')
_RELAYED_MESSAGE = re.compile(r'message: "((?:[^"\\]|\\.)*)"')


def _relayed_own_message(record: logging.LogRecord) -> str | None:
    """The message of a job's own record that a Beam worker logged and the runner relayed."""
    if not record.name.startswith("apache_beam.runners"):
        return None
    text = record.getMessage()
    found = _RELAYED_MESSAGE.search(text)
    return found.group(1) if found and _RELAYED_FROM.search(text) else None


class _OwnWarnings(logging.Filter):
    """The job's own warnings, also those its code logged inside a Beam worker."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        return record.name.startswith(_OWN_LOGGERS) or _relayed_own_message(record) is not None


class _AboveTheBar(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes a record above the progress bar (through tqdm) instead of across it."""

    def format(self, record: logging.LogRecord) -> str:
        relayed = _relayed_own_message(record)
        if relayed is not None:  # the worker's message alone, not the relay's envelope
            record = logging.makeLogRecord({**record.__dict__, "msg": relayed, "args": ()})
        return super().format(record)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def _open_text(path: str) -> IO[str]:
    # backslashreplace: an undecodable file name in a message must not lose the message.
    return open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")


class Console:
    """Sets up a job's terminal for the run (a context manager); ``verbose`` shows everything.

    Until the job's output location is accepted (the committer made its work
    folder ``.<name>.work``), the log is a temporary file: a refused run
    leaves nothing beside an output that is not its own. Then the log moves
    to ``logs/<job>.log`` beside the output, its path is printed, and the
    progress bar starts.
    """

    def __init__(self, prog: str, argv: list[str], verbose: bool, unit: str = "img") -> None:
        self.prog, self.verbose, self.unit = prog, verbose, unit
        self.log: str | None = None
        self._location = output_location(argv)
        self._saved: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._folder: str | None = None
        self._handle: IO[str] | None = None
        self._to_file: logging.StreamHandler | None = None  # type: ignore[type-arg]
        self._settled = False
        self._succeeded = False  # set on exit: the bar then fills to its total
        self.terminal: IO[str] = sys.stderr

    def __enter__(self) -> Console:
        root = logging.getLogger()
        held = [h for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler)]
        self._saved["handlers"] = [h for h in root.handlers if h not in held]
        self._saved["level"] = root.level
        logging.basicConfig(level=logging.INFO, format=_FORMAT, force=True)
        if not self.verbose:
            try:
                self._quiet()
            except OSError as exc:  # no temporary folder: stay live rather than fail
                logging.getLogger(__name__).warning("no log file (%s): logging live", exc)
        for memory in held:  # what the job's imports logged (beam_pipelines.entry_points)
            memory.setTarget(root.handlers[0])
            memory.close()
        if self._handle is not None:
            self._folder = tempfile.mkdtemp(prefix="xray-progress-")
            self._saved["env"] = os.environ.get(PROGRESS_ENV)
            os.environ[PROGRESS_ENV] = self._folder
            self._thread = threading.Thread(target=self._watch, name="progress", daemon=True)
            self._thread.start()
        return self

    def _quiet(self) -> None:
        handle, path = tempfile.mkstemp(prefix=f"{self.prog}-", suffix=".log")
        os.close(handle)
        self._handle, self.log = _open_text(path), path
        self._header(self._handle)
        terminal = os.fdopen(
            os.dup(2), "w", buffering=1, encoding="utf-8", errors="backslashreplace"
        )
        sys.stderr.flush()
        self._saved.update(
            fd=os.dup(2), stderr=sys.stderr, raise_exceptions=logging.raiseExceptions
        )
        os.dup2(self._handle.fileno(), 2)  # C++ messages and worker processes write here too
        # Argparse's usage errors and the job's one-line messages still reach the user.
        sys.stderr = self.terminal = terminal
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        self._to_file = logging.StreamHandler(self._handle)
        self._to_file.setFormatter(logging.Formatter(_FORMAT))
        to_terminal = _AboveTheBar(terminal)
        to_terminal.setFormatter(logging.Formatter(f"{self.prog}: %(levelname)s %(message)s"))
        to_terminal.addFilter(_OwnWarnings())
        root.addHandler(self._to_file)
        root.addHandler(to_terminal)
        logging.captureWarnings(True)
        # A full disk must not turn every later log call into a traceback on the terminal.
        logging.raiseExceptions = False

    def _header(self, handle: IO[str]) -> None:
        handle.write(f"==== {self.prog} pid {os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n")

    def _settle(self) -> bool:
        """Moves the log beside the output once the output is accepted; True when done."""
        if self._location is None:
            return False
        parent, name = self._location
        if not os.path.isdir(os.path.join(parent, f".{name}.work")):
            return False
        assert self._handle is not None and self._to_file is not None and self.log is not None
        final = os.path.join(parent, "logs", f"{self.prog}.log")
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            moved = _open_text(final)
        except OSError:
            return True  # the log stays where it is; its path is named at the end
        self._handle.flush()
        with open(self.log, encoding="utf-8", errors="backslashreplace") as temporary:
            shutil.copyfileobj(temporary, moved)
        os.dup2(moved.fileno(), 2)
        self._to_file.setStream(moved)
        self._handle.close()
        with contextlib.suppress(OSError):
            os.remove(self.log)
        self._handle, self.log = moved, final
        print(f"{self.prog}: log: {final}", file=self.terminal)
        return True

    def _watch(self) -> None:
        """Waits for the output to be accepted, then draws the bar until the run ends."""
        from tqdm import tqdm

        assert self._folder is not None
        bar = None
        while True:
            # Quick until the log is beside the output: a run may fill the disk within a second.
            stopping = self._stop.wait(0.5 if self._settled else 0.05)
            if not self._settled:
                with contextlib.suppress(Exception):
                    self._settled = self._settle()
                if not self._settled:
                    if stopping:
                        return
                    continue
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
                if stopping and self._succeeded and bar.total:
                    done = bar.total  # every input was handled, decoded or rejected
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
        self._succeeded = kind is None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if kind is not None and issubclass(kind, Exception):
            logging.getLogger(self.prog).error("%s failed", self.prog, exc_info=exc)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            if self._saved.get("env") is None:
                os.environ.pop(PROGRESS_ENV, None)
            else:
                os.environ[PROGRESS_ENV] = self._saved["env"]
        if self._handle is None:
            return
        refused = kind is SystemExit and getattr(exc, "code", None) == 2
        if not self._settled:
            self._settled = self._settle()  # a run quicker than the watcher
        if refused and not self._settled and self.log is not None:
            # The one-line reason said it all; nothing is left behind.
            with contextlib.suppress(OSError):
                os.remove(self.log)
            self.log = None
        elif not self._settled and kind is None:
            print(f"{self.prog}: log: {self.log}", file=self.terminal)
        self._restore()

    def _restore(self) -> None:
        """Puts the process back as it was: fd 2, sys.stderr, the root logger, the flags."""
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in self._saved.get("handlers", []):
            root.addHandler(handler)
        root.setLevel(self._saved.get("level", logging.WARNING))
        logging.captureWarnings(False)
        logging.raiseExceptions = self._saved.get("raise_exceptions", True)
        sys.stderr.flush()
        if "fd" in self._saved:
            os.dup2(self._saved["fd"], 2)
            os.close(self._saved["fd"])
        # The terminal stream stays open for cli's last line; fd 2 is the terminal again.
        sys.stderr = self._saved.get("stderr", sys.stderr)
        if self._handle is not None:
            self._handle.close()
