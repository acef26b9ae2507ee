"""beam_pipelines.tfrecord: TensorFlow-compatible, deterministic, atomic."""

from __future__ import annotations

from pathlib import Path

import pytest

from beam_pipelines.tfrecord import read_tfrecord_gz, write_tfrecord_gz

RECORDS = [b"", b"a", bytes(range(256)) * 40, "é".encode()]


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
