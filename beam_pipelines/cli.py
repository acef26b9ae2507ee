"""What every console entry point does around its job's ``run``: logging, exit codes, errors.

Exit codes (documented in the README):

- 0: the job succeeded and committed its output;
- 1: the job failed (one line on stderr; ``--verbose`` shows the traceback);
- 2: refused before any work (bad flags, unusable input or output location);
- 3: the job ran, but nothing was kept or scored (:class:`EmptyRun`); the
  previous output is unchanged;
- 130: interrupted (Ctrl-C); the previous output is unchanged.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from beam_pipelines.console import Console
from beam_pipelines.privacy import install_log_filters

EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_EMPTY = 3
EXIT_INTERRUPTED = 130


class EmptyRun(RuntimeError):
    """A run that kept or scored nothing: not committed, reported, exit code 3."""


def refuse(prog: str, message: str) -> NoReturn:
    """Stops before any work: one line on stderr, exit code 2 (argparse's, without the usage)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_REFUSED)


def wants_traceback(argv: list[str]) -> bool:
    """True when the command line asks for ``--verbose`` (any value)."""
    return any(arg == "--verbose" or arg.startswith("--verbose=") for arg in argv)


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and first line, the innermost Beam wrapper removed."""
    # Beam re-raises a worker's error inside its own wrappers; the cause is what the user needs.
    while exc.__cause__ is not None and type(exc).__module__.startswith(("apache_beam", "grpc")):
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    first = text[-1] if text and "Traceback" in text[0] else (text[0] if text else "")
    return f"{type(exc).__name__}: {first[:500]}"


class _FirstLineOfBeamErrors(logging.Filter):
    """Keeps the first line of the errors Beam logs with a worker's whole traceback.

    The job's own one-line error says what failed; ``--verbose`` keeps everything.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("apache_beam") and record.levelno >= logging.ERROR:
            record.msg = record.getMessage().split("\n", 1)[0]
            record.args = ()
            record.exc_info = record.exc_text = None
        return True


def main(prog: str, run: Callable[[], Any], describe: Callable[[Any], str]) -> NoReturn:
    """Runs a job from its console script and exits with a documented code.

    Without ``--verbose`` the terminal shows the job's warnings, one progress
    bar and the summary line; everything else goes to the log file
    (:mod:`beam_pipelines.console`), named once at the start.
    """
    verbose = wants_traceback(sys.argv[1:])
    console = Console(prog, sys.argv[1:], verbose)
    try:
        with console:
            install_log_filters()  # no header value (PHI) in pydicom's log lines or warnings
            if not verbose and console.log is None:  # logging live: keep Beam's errors short
                for handler in logging.getLogger().handlers:
                    handler.addFilter(_FirstLineOfBeamErrors())
            result = run()
    except EmptyRun as exc:
        print(f"{prog}: warning: {exc}", file=sys.stderr)
        sys.exit(EXIT_EMPTY)
    except KeyboardInterrupt:
        if verbose:
            raise
        print(f"{prog}: interrupted; the previous output is unchanged", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit:
        raise
    except Exception as exc:
        if verbose:
            raise
        if console.log is not None:  # the console wrote the traceback there
            where = f"the traceback is in {console.log}"
        else:
            where = "--verbose shows the traceback"
        print(f"{prog}: error: {one_line(exc)} ({where})", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    print(describe(result))
    sys.exit(0)
