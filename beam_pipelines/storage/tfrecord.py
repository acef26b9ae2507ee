"""Deterministic, atomic gzip TFRecord files without TensorFlow.

The record framing is TensorFlow's: little-endian uint64 length, masked
CRC-32C of the length, the data, masked CRC-32C of the data. Files are
written to a temporary name and renamed into place, so a reader never sees
a partial shard, and gzip headers carry no timestamp, so the same records
give the same bytes.

Compression is split from writing, the way pigz parallelizes gzip: each
record is deflated on its own (:func:`compress_record`, ending on a sync
flush so chunks concatenate into one valid deflate stream) wherever it is
produced, e.g. by the parallel decode stage; the shard writer only
concatenates chunks and combines their CRCs. A shard is one ordinary gzip
member that any gzip or TensorFlow reader reads.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator

import google_crc32c
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_pipelines.storage.files import atomic_create

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


#: Run-length matches only (zlib's Z_RLE) at level 6: on 16-bit image records
#: as small as the default strategy (80.2% vs 79.7% of the framed record,
#: 2500x2048 12-bit radiographs at 224x224) and ~3x faster (0.8 vs 2.5 ms).
COMPRESSION_LEVEL = 6
COMPRESSION_STRATEGY = zlib.Z_RLE
# gzip member header: deflate, no flags, mtime 0, no extra flags, OS unknown.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
# A final, empty fixed-Huffman deflate block: ends the concatenated chunks.
_FINAL_BLOCK = b"\x03\x00"
_CHUNK_HEADER = struct.Struct("<IQ")  # CRC-32 and length of the framed record
_MAX_DEFLATE_RATIO = 1032  # deflate cannot expand data more than this


def compress_record(record: bytes) -> bytes:
    """The framed record, deflated on its own: a chunk for :func:`write_compressed_gz`.

    The chunk carries the CRC-32 and length of the uncompressed framed
    record (the gzip trailer needs both) before its deflate blocks.
    """
    framed = frame(record)
    deflate = zlib.compressobj(
        COMPRESSION_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS, 9, COMPRESSION_STRATEGY
    )
    body = deflate.compress(framed) + deflate.flush(zlib.Z_SYNC_FLUSH)
    return _CHUNK_HEADER.pack(zlib.crc32(framed), len(framed)) + body


def write_compressed_gz(path: str, chunks: Iterable[bytes]) -> int:
    """Writes :func:`compress_record` chunks as one gzip TFRecord file, atomically.

    Returns how many records were written. Works on any filesystem Beam
    knows (local, ``gs://``, …).
    """
    count, crc, size = 0, 0, 0
    with atomic_create(path) as handle:
        handle.write(_GZIP_HEADER)
        for chunk in chunks:
            chunk_crc, length = _CHUNK_HEADER.unpack_from(chunk)
            if length > _MAX_DEFLATE_RATIO * len(chunk):
                raise ValueError(f"not a compressed record chunk (writing {path})")
            crc = _crc32_combine(crc, chunk_crc, length)
            size += length
            handle.write(memoryview(chunk)[_CHUNK_HEADER.size :])
            count += 1
        handle.write(_FINAL_BLOCK + struct.pack("<II", crc, size & 0xFFFFFFFF))
    return count


def write_tfrecord_gz(path: str, records: Iterable[bytes]) -> int:
    """Writes records to a gzip TFRecord file atomically; returns how many."""
    return write_compressed_gz(path, (compress_record(r) for r in records))


_zeros = bytes(1 << 20)


def _crc32_combine_zeros(first: int, second: int, second_length: int) -> int:
    """CRC-32 of A + B from crc(A), crc(B) and len(B), with Python's zlib only.

    CRC-32 is affine over GF(2), so crc(A + B) = crc(A + zeros) ^ crc(B) ^
    crc(zeros) with len(B) zeros. Costs two CRC passes over len(B) bytes
    (~100 us per 100 KB record).
    """
    global _zeros
    if second_length > len(_zeros):
        _zeros = bytes(second_length)
    zeros = memoryview(_zeros)[:second_length]
    return zlib.crc32(zeros, first) ^ second ^ zlib.crc32(zeros)


def _load_zlib_combine() -> Callable[[int, int, int], int]:
    """zlib's own ``crc32_combine64`` (O(log n), ~2 us), else the zero-run method.

    Python's zlib module does not expose it; the C library it links to does.
    The result is checked against the zero-run method before it is trusted.
    """
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("z")
        if name is None:
            return _crc32_combine_zeros
        combine = ctypes.CDLL(name).crc32_combine64
        combine.restype = ctypes.c_ulong
        combine.argtypes = [ctypes.c_ulong, ctypes.c_ulong, ctypes.c_int64]
    except (ImportError, OSError, AttributeError):
        return _crc32_combine_zeros
    probe = (0x1234ABCD, 0x0F0E0D0C, 100_003)
    if combine(*probe) != _crc32_combine_zeros(*probe):
        return _crc32_combine_zeros
    return combine


_combine: Callable[[int, int, int], int] | None = None


def _crc32_combine(first: int, second: int, second_length: int) -> int:
    """CRC-32 of A + B from crc(A), crc(B) and len(B) (zlib's crc32_combine)."""
    global _combine
    if _combine is None:
        _combine = _load_zlib_combine()
    return _combine(first, second, second_length)


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
