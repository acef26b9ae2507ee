"""Deterministic, atomic gzip TFRecord files without TensorFlow.

The record framing is TensorFlow's: little-endian uint64 length, masked
CRC-32C of the length, the data, masked CRC-32C of the data. Files are
written to a temporary name and renamed into place, so a reader never sees
a partial shard, and gzip headers carry no timestamp, so the same records
give the same bytes.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterable, Iterator

import google_crc32c
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_pipelines.files import atomic_create

_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
    """Frames one record the way TFRecord files store it."""
    length = struct.pack("<Q", len(record))
    return b"".join(
        (
            length,
            struct.pack("<I", _masked_crc(length)),
            record,
            struct.pack("<I", _masked_crc(record)),
        )
    )


def write_tfrecord_gz(path: str, records: Iterable[bytes]) -> int:
    """Writes records to a gzip TFRecord file atomically; returns how many.

    Works on any filesystem Beam knows (local, ``gs://``, …).
    """
    count = 0
    # mtime=0 and no file name: identical input gives identical bytes.
    with (
        atomic_create(path) as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as handle,
    ):
        for record in records:
            handle.write(frame(record))
            count += 1
    return count


def read_tfrecord_gz(path: str) -> Iterator[bytes]:
    """Yields the records of a gzip TFRecord file, checking every checksum.

    Raises:
        ValueError: on a truncated file or a checksum mismatch.
    """
    with (
        FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw,
        gzip.GzipFile(fileobj=raw, mode="rb") as handle,
    ):
        while True:
            header = handle.read(12)
            if not header:
                return
            if len(header) < 12:
                raise ValueError(f"truncated record header in {path}")
            length_bytes, length_crc = header[:8], struct.unpack("<I", header[8:])[0]
            if _masked_crc(length_bytes) != length_crc:
                raise ValueError(f"corrupt record length in {path}")
            (length,) = struct.unpack("<Q", length_bytes)
            data = handle.read(length + 4)
            if len(data) < length + 4:
                raise ValueError(f"truncated record in {path}")
            record, data_crc = data[:length], struct.unpack("<I", data[length:])[0]
            if _masked_crc(record) != data_crc:
                raise ValueError(f"corrupt record data in {path}")
            yield record
