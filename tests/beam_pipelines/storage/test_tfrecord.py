"""beam_pipelines.storage.tfrecord: TensorFlow-compatible, deterministic, atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from beam_pipelines.storage.tfrecord import (
    compress_record,
    read_tfrecord_gz,
    write_compressed_gz,
    write_tfrecord_gz,
)

RECORDS = [b"", b"a", bytes(range(256)) * 40, "é".encode(), np.random.bytes(300_000)]


def test_round_trip_and_determinism(tmp_path: Path) -> None:
    first, second = tmp_path / "a.tfrecord.gz", tmp_path / "b.tfrecord.gz"
    assert write_tfrecord_gz(str(first), RECORDS) == len(RECORDS)
    write_tfrecord_gz(str(second), RECORDS)
    assert list(read_tfrecord_gz(str(first))) == RECORDS
    assert first.read_bytes() == second.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] != []  # no temporary files left
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_tensorflow_reads_our_files_and_we_read_its(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    ours = tmp_path / "ours.tfrecord.gz"
    write_tfrecord_gz(str(ours), RECORDS)
    read_back = [r.numpy() for r in tf.data.TFRecordDataset(str(ours), compression_type="GZIP")]
    assert read_back == RECORDS
    theirs = tmp_path / "theirs.tfrecord.gz"
    with tf.io.TFRecordWriter(str(theirs), options="GZIP") as writer:
        for record in RECORDS:
            writer.write(record)
    assert list(read_tfrecord_gz(str(theirs))) == RECORDS


def test_corruption_is_detected(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "c.tfrecord.gz"
    write_tfrecord_gz(str(path), [b"hello world"])
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[14] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ValueError, match="corrupt"):
        list(read_tfrecord_gz(str(path)))


def test_chunks_compressed_apart_make_one_ordinary_gzip_member(tmp_path: Path) -> None:
    import gzip
    import zlib

    from beam_pipelines.storage.tfrecord import frame

    chunks = [compress_record(r) for r in RECORDS]
    path = tmp_path / "chunks.tfrecord.gz"
    assert write_compressed_gz(str(path), iter(chunks)) == len(RECORDS)
    data = path.read_bytes()
    # One member: a plain inflate consumes everything but the 8-byte trailer.
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    content = inflate.decompress(data)
    assert inflate.eof and inflate.unused_data == b""
    assert content == b"".join(frame(r) for r in RECORDS)
    assert gzip.decompress(data) == content  # CRC and length trailer checked
    # Compressing apart costs little: 300 kB of random bytes dominate the size.
    assert len(data) < sum(len(r) for r in RECORDS) * 1.01 + 200
    assert list(read_tfrecord_gz(str(path))) == RECORDS
    # Writing records directly is the same thing, byte for byte.
    direct = tmp_path / "direct.tfrecord.gz"
    write_tfrecord_gz(str(direct), RECORDS)
    assert direct.read_bytes() == data


def test_empty_file_is_valid_gzip(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "empty.tfrecord.gz"
    assert write_tfrecord_gz(str(path), []) == 0
    assert gzip.decompress(path.read_bytes()) == b""
    assert list(read_tfrecord_gz(str(path))) == []


def test_a_chunk_that_is_not_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a compressed record chunk"):
        write_compressed_gz(str(tmp_path / "x.tfrecord.gz"), [b"\xff" * 40])
    assert list(tmp_path.iterdir()) == []  # nothing half-written left


def test_crc32_combine_agrees_with_one_pass_over_both_parts() -> None:
    import zlib

    from beam_pipelines.storage import tfrecord

    rng = np.random.default_rng(7)
    for first_size, second_size in ((0, 0), (1, 0), (0, 5), (1000, 100_003), (3, 2_000_000)):
        first = rng.bytes(first_size)
        second = rng.bytes(second_size)
        expected = zlib.crc32(first + second)
        crcs = (zlib.crc32(first), zlib.crc32(second), second_size)
        assert tfrecord._crc32_combine(*crcs) == expected
        # The pure-Python method the job falls back to without zlib's C function.
        assert tfrecord._crc32_combine_zeros(*crcs) == expected
    # This machine's zlib has crc32_combine64, so the fast path is the one tested.
    assert tfrecord._load_zlib_combine() is not tfrecord._crc32_combine_zeros
