"""Bounded reading and decoding: what a file may cost before it is a verdict.

Special files are refused before a byte is read (a FIFO hung the job, a
device was read up to the size limit), a stalled remote read gives up after
``read_timeout_s``, and a deflated data set is inflated no further than its
header declares (a 2 MB file inflating to 2 GiB took 4.3 GB of memory).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from archive_tools.dicom_writer import PixelFormat, RadiographHeader, write_dicom
from beam_pipelines.dicom import (
    DecodeOptions,
    DicomRejected,
    decode,
    decode_model_input,
    read_dataset,
    read_image,
    read_source_bytes,
)

HEADER = RadiographHeader(patient_id="P000001", study_id="S0001")
REPO = Path(__file__).resolve().parents[3]
DEFLATED = pydicom.uid.DeflatedExplicitVRLittleEndian


def _file(stored: np.ndarray, encoding: str, bits: int = 8) -> bytes:
    buffer = io.BytesIO()
    write_dicom(buffer, stored, PixelFormat(bits_stored=bits), encoding, HEADER)
    return buffer.getvalue()


def _rejected(call: Callable[[], Any]) -> DicomRejected:
    with pytest.raises(DicomRejected) as rejected:
        call()
    return rejected.value


def _within(seconds: float, call: Callable[[], Any]) -> DicomRejected:
    """The reject ``call`` raises, failing (not hanging) when it takes longer than ``seconds``."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    assert outcome and isinstance(outcome[0], DicomRejected), outcome
    return outcome[0]


# --------------------------------------------------------------------------
# Only regular files are opened


def test_fifo_is_rejected_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "archive.dcm"
    os.mkfifo(fifo)
    try:
        for source in (str(fifo), f"file://{fifo}"):
            for call in (read_image, lambda s: decode_model_input(s)[0]):
                rejected = _within(5, functools.partial(call, source))
                assert rejected.reason == "unreadable"
                assert rejected.detail == "not a regular file (FIFO)"
    finally:
        # Releases a reader a regression left blocked in open().
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_directory_is_rejected(tmp_path: Path) -> None:
    rejected = _rejected(lambda: read_image(str(tmp_path)))
    assert (rejected.reason, rejected.detail) == ("unreadable", "not a regular file (directory)")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_character_device_is_not_read(device: str) -> None:
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    rejected = _within(5, lambda: read_source_bytes(device))
    assert (rejected.reason, rejected.detail) == (
        "unreadable",
        "not a regular file (character device)",
    )


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets")
def test_socket_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "s.dcm"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        rejected = _within(5, lambda: read_image(str(path)))
    assert (rejected.reason, rejected.detail) == ("unreadable", "not a regular file (socket)")


def test_symlinks_are_followed_to_what_they_name(tmp_path: Path) -> None:
    image = tmp_path / "image.dcm"
    image.write_bytes(_file(np.arange(48, dtype=np.uint8).reshape(6, 8), "explicit_le"))
    (tmp_path / "link.dcm").symlink_to(image)
    assert read_image(str(tmp_path / "link.dcm")).shape == (6, 8)
    assert read_image(f"file://{tmp_path / 'link.dcm'}").shape == (6, 8)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "fifo_link.dcm").symlink_to(tmp_path / "fifo")
    rejected = _within(5, lambda: read_image(str(tmp_path / "fifo_link.dcm")))
    assert rejected.detail == "not a regular file (FIFO)"
    (tmp_path / "dangling.dcm").symlink_to(tmp_path / "absent.dcm")
    assert _rejected(lambda: read_image(str(tmp_path / "dangling.dcm"))).reason == "missing_file"


def test_missing_paths_stay_missing_file(tmp_path: Path) -> None:
    (tmp_path / "file.dcm").write_bytes(b"x")
    for path in (tmp_path / "absent.dcm", tmp_path / "file.dcm" / "below.dcm"):
        rejected = _rejected(functools.partial(read_image, str(path)))
        assert (rejected.reason, rejected.detail) == ("missing_file", "no file at the given path")


def test_unreadable_path_is_not_named_in_the_detail(tmp_path: Path) -> None:
    path = tmp_path / "P000001_secret.dcm"
    path.symlink_to(tmp_path / "loop.dcm")
    (tmp_path / "loop.dcm").symlink_to(path)  # ELOOP, even for root
    rejected = _rejected(lambda: read_image(str(path)))
    assert rejected.reason == "unreadable" and rejected.detail.startswith("OSError")
    assert "P000001" not in rejected.detail and str(tmp_path) not in rejected.detail


# --------------------------------------------------------------------------
# Per-file time budget for remote reads


class _SlowStream:
    """A remote file that trickles: small chunks, a pause before each, no fileno."""

    def __init__(self, size: int | None = None) -> None:
        self.left = size

    def read(self, size: int = -1) -> bytes:
        time.sleep(0.01)
        if self.left is None:
            return b"\0" * 1024
        chunk = b"\0" * min(1024, self.left, size if size >= 0 else self.left)
        self.left -= len(chunk)
        return chunk

    def __enter__(self) -> _SlowStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def test_slow_read_gives_up_after_the_budget() -> None:
    started = time.monotonic()
    rejected = _rejected(lambda: read_source_bytes(_SlowStream(), read_timeout_s=0.2))  # type: ignore[arg-type]
    assert rejected.reason == "unreadable"
    assert rejected.detail.startswith("reading took longer than 0.2 s")
    assert time.monotonic() - started < 2
    # A trickle that ends within its budget is read whole.
    assert read_source_bytes(_SlowStream(5000), read_timeout_s=5) == bytes(5000)  # type: ignore[arg-type]


def test_read_timeout_comes_from_the_options_for_remote_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from apache_beam.io.filesystems import FileSystems

    monkeypatch.setattr(FileSystems, "open", lambda path, **kwargs: _SlowStream())
    started = time.monotonic()
    options = DecodeOptions(read_timeout_s=0.2)
    rejected = _rejected(lambda: read_dataset("gs://bucket/stalled.dcm", options))
    assert rejected.reason == "unreadable" and "longer than 0.2 s" in rejected.detail
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan")])
def test_read_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match="read_timeout_s"):
        DecodeOptions(read_timeout_s=timeout)


# --------------------------------------------------------------------------
# Deflated data sets inflate no further than their header declares


def _deflated_parts(stored: np.ndarray, bits: int = 8) -> tuple[bytes, bytes]:
    """(file meta, inflated data set) of a valid deflated radiograph."""
    data = _file(stored, "deflate", bits)
    assert data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) File Meta Group Length
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    return data[:meta_end], zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[meta_end:])


def _deflate(body: bytes, zeros: int = 0) -> bytes:
    """``body`` then ``zeros`` zero bytes, deflated without ever holding the zeros.

    After a full flush the compressor refers to nothing before it, so one
    deflated MiB of zeros can be repeated: 2 GiB of zeros take 2 MB.
    """
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = packer.compress(body) + packer.flush(zlib.Z_FULL_FLUSH)
    mebibyte = packer.compress(bytes(1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)
    return head + mebibyte * (zeros >> 20) + packer.flush()


def _bomb(zeros: int) -> bytes:
    """A valid deflated 64x64 8-bit file whose data set goes on with ``zeros`` zero bytes."""
    meta, body = _deflated_parts(np.zeros((64, 64), np.uint8))
    return meta + _deflate(body, zeros)


@pytest.mark.parametrize("preamble", [True, False])
def test_deflate_bomb_is_too_large_at_once(preamble: bool) -> None:
    bomb = _bomb(256 << 20)
    assert len(bomb) < 400_000  # 256 MiB inflated
    if not preamble:  # a raw data set led by its file meta group
        bomb = bomb[132:]
    for call in (read_image, lambda d: decode_model_input(d)[0]):
        started = time.perf_counter()
        rejected = _rejected(functools.partial(call, bomb))
        assert rejected.reason == "too_large"
        assert "its header declares" in rejected.detail
        assert time.perf_counter() - started < 2  # inflating it all took seconds


_BOMB_CHILD = """
import json, resource, sys
from beam_pipelines.dicom import DicomRejected, decode_model_input, read_image

def peak():  # bytes
    try:  # this process's own high-water mark: ru_maxrss also counts what fork copied
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM:"))
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # KiB on Linux

imported = peak()
if sys.platform.startswith("linux"):  # a regression fails here instead of swapping the machine
    with open("/proc/self/statm") as statm:
        in_use = int(statm.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (in_use + (3 << 30), resource.RLIM_INFINITY))
verdicts = []
for call in (read_image, lambda path: decode_model_input(path)[0]):
    try:
        call(sys.argv[1])
        verdicts.append("decoded")
    except DicomRejected as exc:
        verdicts.append(exc.reason)
    except MemoryError:
        verdicts.append("MemoryError")
print(json.dumps({"verdicts": verdicts, "imported": imported, "peak": peak()}))
"""


def test_deflate_bomb_of_2_gib_stays_small_in_memory(tmp_path: Path) -> None:
    """Measured in a fresh process: its peak RSS, imports included, is the bound."""
    path = tmp_path / "bomb.dcm"
    path.write_bytes(_bomb(2 << 30))
    assert path.stat().st_size < 3_000_000
    done = subprocess.run(
        [sys.executable, "-c", _BOMB_CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["verdicts"] == ["too_large", "too_large"]
    assert report["peak"] < 1 << 30, report
    # Beyond the imports: the 16 MiB header allowance, and little else.
    assert report["peak"] - report["imported"] < 100 << 20, report


def test_deflated_image_past_the_header_allowance_decodes_like_uncompressed() -> None:
    rows, cols = 2304, 4096  # 18.9 MB of 16-bit pixels: past the 16 MiB allowance
    stored = (np.add.outer(np.arange(rows) * 3, np.arange(cols)) % 4096).astype(np.uint16)
    deflated = decode(_file(stored, "deflate", bits=12))
    plain = decode(_file(stored, "explicit_le", bits=12))
    assert deflated.header.transfer_syntax_uid == DEFLATED
    assert np.array_equal(deflated.image, plain.image)
    with pytest.raises(DicomRejected) as rejected:
        decode(_file(stored, "deflate", bits=12), DecodeOptions(max_file_bytes=1 << 24))
    assert rejected.value.reason == "too_large"


def _deflated_with(edit: Callable[[pydicom.Dataset], None]) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_file(np.zeros((64, 64), np.uint8), "deflate")))
    edit(ds)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def test_short_pixel_data_past_the_allowance_is_still_a_length_mismatch() -> None:
    def short_pixels(ds: pydicom.Dataset) -> None:
        ds.Rows, ds.Columns = 5000, 5000  # 25 MB declared, 20 MiB present
        ds.PixelData = bytes(20 << 20)

    data = _deflated_with(short_pixels)
    assert _rejected(lambda: read_image(data)).reason == "pixel_length_mismatch"
    # A header declaring more than the file limit is refused before inflating it.
    rejected = _rejected(lambda: read_image(data, DecodeOptions(max_file_bytes=20 << 20)))
    assert rejected.reason == "too_large" and "declares" in rejected.detail


def test_header_larger_than_the_allowance_is_too_large() -> None:
    def big_private_block(ds: pydicom.Dataset) -> None:
        ds.add_new(0x00090010, "LO", "VENDOR")
        ds.add_new(0x00091010, "OB", bytes(17 << 20))

    rejected = _rejected(lambda: read_image(_deflated_with(big_private_block)))
    assert rejected.reason == "too_large" and "no pixel data in its first" in rejected.detail


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # zeros look like implicit VR
def test_zeros_in_place_of_a_header_are_too_large_quickly() -> None:
    """16 MiB of zeros read as tiny elements took pydicom 8 s: the scan gives up early."""
    meta, _ = _deflated_parts(np.zeros((64, 64), np.uint8))
    started = time.perf_counter()
    rejected = _rejected(lambda: read_image(meta + _deflate(b"", 20 << 20)))
    assert rejected.reason == "too_large" and "no pixel data in its first" in rejected.detail
    assert time.perf_counter() - started < 2


def test_deflated_raw_data_set_still_decodes() -> None:
    stored = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    data = _file(stored, "deflate")
    raw = decode(data[132:])  # no preamble: the file meta group comes first
    assert raw.header.transfer_syntax_uid == DEFLATED
    assert np.array_equal(raw.image, decode(data).image)


def test_cut_deflated_file_is_truncated() -> None:
    """Judged on the inflated bytes, like an uncompressed file (pydicom's zlib said not_dicom)."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    meta, body = _deflated_parts(noise)
    data = meta + _deflate(body)
    assert read_image(data).shape == (64, 64)  # deflated again by this test: still a valid file
    cut = data[: (len(meta) + len(data)) // 2]  # inside the pixel data
    assert _rejected(lambda: read_image(cut)).reason == "truncated"
    corrupt = meta + b"\xff" * 64  # deflate block type 3 is reserved
    assert _rejected(lambda: read_image(corrupt)).reason == "not_dicom"
