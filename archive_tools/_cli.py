"""Helpers shared by the archive-writing command-line tools."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from pathlib import Path

#: What a tool owns inside an output directory (removed by --overwrite, nothing else is).
ARCHIVE_ENTRIES = (
    "raw",
    "metadata.csv",
    "expected_rejects.csv",
    "synth_images.csv",
    "import_errors.csv",
)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def default_workers() -> int:
    """All cores, as the default for --workers."""
    return os.cpu_count() or 1


def prepare_output_dir(parser: argparse.ArgumentParser, output_dir: Path, overwrite: bool) -> None:
    """Creates ``output_dir`` or, with ``overwrite``, clears what an earlier run wrote.

    A non-empty directory without ``overwrite`` is an argparse error (exit 2),
    so an existing archive is never mixed with a new one.
    """
    if output_dir.exists() and not output_dir.is_dir():
        parser.error(f"--output_dir {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            parser.error(
                f"--output_dir {output_dir} exists and is not empty; "
                "pass --overwrite to replace the archive in it"
            )
        for name in ARCHIVE_ENTRIES:
            entry = output_dir / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def safe_name(text: str, fallback: str = "x") -> str:
    """A file-system-safe path component for an identifier (``/`` and spaces become ``_``)."""
    cleaned = _UNSAFE.sub("_", text).strip("._")
    return cleaned or fallback


def quiet_codec_loggers() -> None:
    """Silences codec plugins that log every encoded image at INFO (openjpeg does)."""
    for name in ("openjpeg", "libjpeg", "pylibjpeg"):
        logging.getLogger(name).setLevel(logging.WARNING)
