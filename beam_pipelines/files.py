"""Atomic file writes on any Beam filesystem (local, gs://, …).

A reader never sees a partial file: bytes go to a temporary name beside the
target, which is renamed into place once complete.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems


@contextmanager
def atomic_create(path: str) -> Iterator[BinaryIO]:
    """Yields a binary handle; on success the data appears at ``path`` at once."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with FileSystems.create(
            temporary, compression_type=CompressionTypes.UNCOMPRESSED
        ) as handle:
            yield handle
    except BaseException:
        if FileSystems.exists(temporary):
            FileSystems.delete([temporary])
        raise
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])


def write_text(path: str, text: str) -> str:
    """Writes a text file atomically; returns its path."""
    with atomic_create(path) as handle:
        handle.write(text.encode("utf-8"))
    return path


def read_bytes(path: str) -> bytes:
    """Reads a whole file (no decompression, whatever its name)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read()


def remove_matching(patterns: list[str]) -> list[str]:
    """Deletes every file matching the glob patterns; returns what was deleted."""
    found = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    if found:
        FileSystems.delete(found)
    return found
