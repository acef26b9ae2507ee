"""The bytes of a DICOM source (path, URI, bytes or file object), read within bounds.

Local files are read directly (regular files only); a ``dicomweb+http(s)://``
instance from its PACS (:func:`beam_pipelines.storage.dicomweb.fetch_instance`,
WADO-RS); anything else through :func:`beam_pipelines.storage.files.open_stored`
(Beam's FileSystems, which that module imports only for a non-local path), so
this package never imports Beam itself and decoding local files never loads
it.
"""

from __future__ import annotations

import io
import os
import stat
import time
from collections.abc import Callable
from typing import BinaryIO

from beam_pipelines.dicom.errors import DicomRejected
from beam_pipelines.dicom.options import DEFAULT_OPTIONS
from beam_pipelines.privacy import redact
from beam_pipelines.storage.dicomweb import (
    DicomwebSettings,
    FetchFailed,
    TooLarge,
    fetch_instance,
    is_dicomweb,
)

Source = str | bytes | bytearray | memoryview | BinaryIO


def read_source_bytes(
    source: Source,
    max_bytes: int = DEFAULT_OPTIONS.max_file_bytes,
    read_timeout_s: float = DEFAULT_OPTIONS.read_timeout_s,
    dicomweb: DicomwebSettings | None = DEFAULT_OPTIONS.dicomweb,
) -> bytes:
    """Reads a file's bytes from a path/URI (Beam FileSystems), bytes or a file object.

    A local path (no scheme, or ``file://``) must name a regular file (or a
    symlink to one): a FIFO, socket, device or directory is refused before
    any byte is read. A remote read, or a file object of unknown size, stops
    after ``read_timeout_s`` seconds. A ``dicomweb+http(s)://`` path is
    fetched with ``dicomweb``'s credentials, timeout and retries (anonymously
    with the defaults when None).

    Raises:
        DicomRejected: ``missing_file``, ``unreadable``, ``empty_file``,
            ``too_large`` or ``fetch_failed`` (a DICOMweb request that failed
            for good; the detail names the HTTP status or the connection
            problem and the attempts made).
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif isinstance(source, str) and is_dicomweb(source):
        data = _fetch(source, dicomweb, max_bytes)
    elif isinstance(source, str):
        data = _read_path(source, max_bytes, read_timeout_s)
    else:
        data = _read_limited(source, max_bytes, read_timeout_s)
    if not data:
        raise DicomRejected("empty_file", "the file has no bytes")
    if len(data) > max_bytes:
        raise DicomRejected("too_large", f"file is larger than {max_bytes} bytes")
    return data


def _fetch(path: str, settings: DicomwebSettings | None, max_bytes: int) -> bytes:
    """A DICOMweb instance's stored bytes; failures become rejects (never the URL: PHI)."""
    try:
        return fetch_instance(path, settings, max_bytes)
    except TooLarge as exc:
        raise DicomRejected("too_large", f"file is larger than {max_bytes} bytes") from exc
    except FetchFailed as exc:
        raise DicomRejected("fetch_failed", str(exc)) from exc


def _read_path(path: str, max_bytes: int, timeout_s: float) -> bytes:
    from beam_pipelines.storage import files

    if files.is_local(path):
        return _read_local(files.local_path(path), max_bytes, timeout_s)
    try:
        # As stored: a DICOM named *.gz must not be silently gunzipped.
        with files.open_stored(path) as handle:
            return _read_limited(handle, max_bytes, timeout_s)
    except FileNotFoundError as exc:
        raise DicomRejected("missing_file", "no file at the given path") from exc
    except OSError as exc:
        # Beam wraps "not found" in BeamIOError (an OSError) on some filesystems.
        if not files.exists(path):
            raise DicomRejected("missing_file", "no file at the given path") from exc
        raise DicomRejected("unreadable", f"{type(exc).__name__}: {redact(exc)}") from exc


# Opening a FIFO blocks until a writer appears (forever, in an archive), and
# a terminal would become the worker's controlling terminal.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
_FILE_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def _not_regular(mode: int) -> DicomRejected | None:
    """The reject for a file that is not a regular one (a FIFO, a device...), else None."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "special file")
    return DicomRejected("unreadable", f"not a regular file ({kind})")


def _read_local(path: str, max_bytes: int, timeout_s: float) -> bytes:
    """Reads a local regular file; anything else is refused before a byte is read.

    ``stat`` first, so a device is never even opened (opening one can have
    effects: a tape rewinds, a watchdog arms); then ``fstat`` on the opened
    descriptor, so a path swapped in between is caught too. /dev/zero would
    otherwise be read up to the size limit and a FIFO would hang the job.
    """
    try:
        rejected = _not_regular(os.stat(path).st_mode)
        if rejected is not None:
            raise rejected
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise DicomRejected("missing_file", "no file at the given path") from exc
    except OSError as exc:
        raise DicomRejected("unreadable", f"{type(exc).__name__}: {redact(exc)}") from exc
    try:
        rejected = _not_regular(os.fstat(fd).st_mode)
        if rejected is not None:
            raise rejected
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)  # a FUSE mount (gcsfuse, s3fs) may honour it
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    try:
        with handle:
            return _read_limited(handle, max_bytes, timeout_s)
    except OSError as exc:
        raise DicomRejected("unreadable", f"{type(exc).__name__}: {redact(exc)}") from exc


def _read_limited(handle: BinaryIO, max_bytes: int, timeout_s: float) -> bytes:
    """Reads at most ``max_bytes + 1`` bytes without allocating that much up front.

    ``read(n)`` reserves n bytes first, which costs milliseconds for a
    2 GiB limit; a local file's size is known, a remote one is read in
    chunks, and given up on (``unreadable``) once that has taken longer than
    ``timeout_s``: a stalled object store must not hold a worker forever.
    """
    try:
        size: int | None = os.fstat(handle.fileno()).st_size
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        size = None
    if size is not None:
        if size > max_bytes:
            raise DicomRejected("too_large", f"file is larger than {max_bytes} bytes")
        return handle.read(size + 1)
    chunks, total = [], 0
    started = time.monotonic()
    while total <= max_bytes:
        if time.monotonic() - started > timeout_s:
            raise DicomRejected(
                "unreadable",
                f"reading took longer than {timeout_s:g} s (stopped after {total} bytes)",
            )
        chunk = handle.read(min(16 << 20, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)
