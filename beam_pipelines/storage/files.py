"""Files on any Beam filesystem (local, gs://, …): atomic writes, listing, input checks.

A reader never sees a partial file: bytes go to a temporary name beside the
target, which is renamed into place once complete. Beam's FileSystems is
imported only where a function needs it, so the trainer and the analysis
(local paths) never load the Beam SDK through this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, BinaryIO


@contextmanager
def atomic_create(path: str) -> Iterator[BinaryIO]:
    """Yields a binary handle; on success the data appears at ``path`` at once."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    if is_local(path):  # the OS's rename: no Beam SDK for the trainer and the analysis
        os.makedirs(os.path.dirname(local_path(path)) or ".", exist_ok=True)  # as Beam's does
        try:
            with open(local_path(temporary), "wb") as local:
                yield local
        except BaseException:
            with suppress(FileNotFoundError):
                os.remove(local_path(temporary))
            raise
        os.replace(local_path(temporary), local_path(path))
        return
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.create(
            temporary, compression_type=CompressionTypes.UNCOMPRESSED
        ) as handle:
            yield handle
    except BaseException:
        if FileSystems.exists(temporary):
            FileSystems.delete([temporary])
        raise
    move(temporary, path)


def write_text(path: str, text: str) -> str:
    """Writes a text file atomically; returns its path."""
    with atomic_create(path) as handle:
        handle.write(text.encode("utf-8"))
    return path


def read_bytes(path: str) -> bytes:
    """Reads a whole file (no decompression, whatever its name)."""
    with open_stored(path) as handle:
        return handle.read()


def open_stored(path: str) -> BinaryIO:
    """Opens a file for reading its bytes as stored: no decompression, whatever its name."""
    if is_local(path):
        return open(local_path(path), "rb")
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def is_local(path: str) -> bool:
    """True for a path on a local or mounted (POSIX) filesystem, not an object store."""
    return "://" not in path or path.startswith("file://")


def local_path(path: str) -> str:
    """The OS path of a local path or ``file://`` URI."""
    return path[len("file://") :] if path.startswith("file://") else path


def files_below(root: str) -> list[str]:
    """Every file below root, relative to it, sorted (empty when root does not exist)."""
    if is_local(root):
        base = local_path(root)
        found = []
        for folder, _, names in os.walk(base):
            found += [os.path.relpath(os.path.join(folder, name), base) for name in names]
        return sorted(found)
    from apache_beam.io.filesystems import FileSystems

    prefix = root.rstrip("/") + "/"
    matched = FileSystems.match([f"{glob.escape(prefix)}**"])[0].metadata_list
    return sorted(m.path[len(prefix) :] for m in matched)


def remove_tree(root: str) -> None:
    """Deletes a folder (or an object-store prefix) and everything below it."""
    if is_local(root):
        shutil.rmtree(local_path(root), ignore_errors=True)
        return
    from apache_beam.io.filesystems import FileSystems

    found = [f"{root.rstrip('/')}/{name}" for name in files_below(root)]
    if found:
        FileSystems.delete(found)


def input_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be read as an input file, or None when it can."""
    if not is_local(path):
        from apache_beam.io.filesystems import FileSystems

        return None if FileSystems.exists(path) else "not found"
    try:
        mode = os.stat(local_path(path)).st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if not os.access(local_path(path), os.R_OK):
        return "is not readable (permission denied)"
    return None


def flagged_input_problem(inputs: list[tuple[str, str | None]]) -> str | None:
    """The first ``"--flag path: problem"`` among (flag, path) inputs, or None; unset flags pass."""
    for flag, path in inputs:
        problem = path and input_file_problem(path)
        if problem:
            return f"{flag} {path}: {problem}"
    return None


def remove_matching(patterns: list[str]) -> list[str]:
    """Deletes every file matching the glob patterns; returns what was deleted.

    Callers escape the literal parts (``glob.escape``): a ``?`` or ``[`` in a
    user's folder name must never match a neighbour.
    """
    from apache_beam.io.filesystems import FileSystems

    found = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    if found:
        FileSystems.delete(found)
    return found


# --- Whole-output operations (the committer's): the OS for local paths, Beam's FileSystems else.


def exists(path: str) -> bool:
    """Whether a file or folder (or a dangling symlink) is at ``path``."""
    if is_local(path):
        return os.path.lexists(local_path(path))
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(path)


def read_json(path: str) -> dict[str, Any] | None:
    """A JSON object file's content; None when missing, unparsable or not an object."""
    if not exists(path):
        return None
    try:
        value = json.loads(read_bytes(path))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def write_json(path: str, value: dict[str, Any]) -> str:
    """Writes a JSON object atomically (sorted keys, indented: the same bytes on reruns)."""
    return write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def move(source: str, target: str) -> None:
    """Renames one file into place (replacing a file of that name)."""
    if is_local(source):
        os.makedirs(os.path.dirname(local_path(target)) or ".", exist_ok=True)
        os.replace(local_path(source), local_path(target))
        return
    from apache_beam.io.filesystems import FileSystems

    if FileSystems.exists(target):
        FileSystems.delete([target])
    FileSystems.rename([source], [target])


def delete(paths: list[str]) -> None:
    """Deletes the files of ``paths`` that exist."""
    existing = [p for p in paths if exists(p)]
    if not existing:
        return
    if is_local(existing[0]):
        for path in existing:
            os.remove(local_path(path))
        return
    from apache_beam.io.filesystems import FileSystems

    FileSystems.delete(existing)


def remove_empty_folders(root: str) -> None:
    """Removes root and the folders below it that hold no file (local only)."""
    base = local_path(root)
    for folder, _, _ in sorted(os.walk(base), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def exchange(first: str, second: str) -> bool:
    """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), second)
