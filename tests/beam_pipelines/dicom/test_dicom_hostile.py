"""Hostile or broken files the fuzz campaign found: each becomes a reject or a sane image.

(tests/fuzz/test_dicom_fuzz.py searches at random; these pin down
what it found, so a regression fails here with a name.)
"""

from __future__ import annotations

import io
import time

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from archive_tools.dicom_writer import PixelFormat, RadiographHeader, write_dicom
from beam_pipelines.dicom import (
    DecodeOptions,
    DicomRejected,
    decode_model_input,
    frames,
    read_image,
)

HEADER = RadiographHeader(patient_id="P000001", study_id="S0001")


def _seed(encoding: str, rows: int = 24, cols: int = 16, bits: int = 12) -> bytes:
    if encoding == "j2k":  # OpenJPEG's 6 resolution levels need a bigger image
        rows, cols = max(rows, 40), max(cols, 32)
    fmt = PixelFormat(bits_stored=bits)
    stored = (np.arange(rows * cols) * 37 % (2**bits)).reshape(rows, cols).astype(fmt.dtype)
    buffer = io.BytesIO()
    write_dicom(buffer, stored, fmt, encoding, HEADER)
    return buffer.getvalue()


def _with(data: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(io.BytesIO(data))
    edit(ds)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _assert_sane(data: bytes) -> None:
    for image in (read_image(data), decode_model_input(data)[0]):
        assert np.isfinite(image).all() and 0.0 <= image.min() <= image.max() <= 1.0


@pytest.mark.parametrize(
    ("encoding", "marker", "fields"),
    [
        ("j2k", b"\xff\x4f\xff\x51", ((8, 4), (12, 4), (24, 4), (28, 4))),  # Xsiz Ysiz XTsiz YTsiz
        ("jpeg_baseline", b"\xff\xc0", ((5, 2), (7, 2))),  # SOF0 Y, X
        ("jpegls", b"\xff\xf7", ((5, 2), (7, 2))),  # SOF55 Y, X
    ],
)
def test_frame_claiming_a_huge_image_is_rejected_before_decoding(
    encoding: str, marker: bytes, fields: tuple[tuple[int, int], ...]
) -> None:
    data = bytearray(_seed(encoding, bits=8 if encoding == "jpeg_baseline" else 12))
    at = data.index(marker)
    for offset, size in fields:
        data[at + offset : at + offset + size] = (30000).to_bytes(size, "big")
    for call in (read_image, lambda d: decode_model_input(d)[0]):
        started = time.perf_counter()
        with pytest.raises(DicomRejected) as rejected:
            call(bytes(data))
        assert rejected.value.reason == "decode_failed"
        assert "30000x30000" in rejected.value.detail
        assert time.perf_counter() - started < 2  # decoding it took seconds and gigabytes


@pytest.mark.parametrize(
    ("encoding", "marker"), [("jpeg_baseline", b"\xff\xc0"), ("jpegls", b"\xff\xf7")]
)
def test_frame_of_height_zero_is_rejected_before_decoding(encoding: str, marker: bytes) -> None:
    """Height 0 (a DNL stream) made pylibjpeg-libjpeg allocate 23 GB for a 1.7 KB file."""
    data = bytearray(_seed(encoding, bits=8 if encoding == "jpeg_baseline" else 12))
    at = data.index(marker)
    data[at + 5 : at + 7] = bytes(2)
    for call in (read_image, lambda d: decode_model_input(d)[0]):
        with pytest.raises(DicomRejected) as rejected:
            call(bytes(data))
        assert rejected.value.reason == "decode_failed" and "0x16" in rejected.value.detail


def test_j2k_of_tiny_tiles_is_rejected() -> None:
    """2x2-pixel tiles cost OpenJPEG ~500 MB and a second, whatever the image size."""
    data = bytearray(_seed("j2k", rows=80, cols=64))  # 5120 one-pixel tiles
    siz = data.index(b"\xff\x4f\xff\x51") + 4  # Lsiz
    for offset in (20, 24):  # XTsiz, YTsiz
        data[siz + offset : siz + offset + 4] = (1).to_bytes(4, "big")
    for call in (read_image, lambda d: decode_model_input(d)[0]):
        with pytest.raises(DicomRejected) as rejected:
            call(bytes(data))
        assert rejected.value.reason == "decode_failed" and "tiles" in rejected.value.detail


def test_gdcm_is_only_a_last_resort() -> None:
    # GDCM aborts the process on malformed input: no except clause catches that.
    assert frames.plugin_order(("gdcm", "pillow", "pylibjpeg")) == ["pillow", "pylibjpeg"]
    j2k = "1.2.840.10008.1.2.4.90"  # the fastest plugin for the syntax goes first
    assert frames.plugin_order(("gdcm", "pillow", "pylibjpeg"), j2k) == ["pylibjpeg", "pillow"]
    assert frames.plugin_order(("gdcm",)) == ["gdcm"]
    assert frames.plugin_order(()) == [""]  # native data: pydicom decodes it itself


def test_codec_panic_is_a_reject() -> None:
    """pylibjpeg-rle panics (a Rust BaseException, not an Exception) on corrupt segments."""
    data = _seed("rle")
    ds = pydicom.dcmread(io.BytesIO(data))
    at = len(data) - len(ds.PixelData) + 229  # inside the segment data
    corrupt = data[:at] + bytes(4) + data[at + 4 :]
    for call in (read_image, lambda d: decode_model_input(d)[0]):
        with pytest.raises(DicomRejected) as rejected:
            call(corrupt)
        assert rejected.value.reason == "decode_failed"


def test_empty_lut_data_is_ignored_not_nan() -> None:
    def empty_lut(ds: Dataset) -> None:
        item = Dataset()
        item.LUTDescriptor = [6, 0, 8]
        item.LUTData = b""
        item["LUTData"].VR = "OW"
        ds.ModalityLUTSequence = Sequence([item])

    _assert_sane(_with(_seed("explicit_le"), empty_lut))


@pytest.mark.parametrize(
    ("tag", "vr", "value"), [(0x00283000, "IS", "512"), (0x00283010, "SS", -1)]
)
def test_lut_sequence_tag_with_another_vr_reads_as_absent(tag: int, vr: str, value: object) -> None:
    _assert_sane(_with(_seed("explicit_le"), lambda ds: ds.add_new(tag, vr, value)))


def test_overflowing_rescale_is_a_reject_or_finite() -> None:
    for slope in (1e300, 1e308):
        data = _with(_seed("explicit_le"), lambda ds, s=slope: setattr(ds, "RescaleSlope", s))
        try:
            _assert_sane(data)
        except DicomRejected as rejected:
            assert rejected.reason == "unsupported_pixel_format"


def test_unknown_pixel_data_vr_is_a_reject() -> None:
    """pydicom converts an element with an unknown VR on first access and raises."""
    data = _seed("j2k")
    at = data.rindex(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")  # (7FE0,0010) OB
    value = data[at + 12 : at + 12 + 64]
    # Pixel Data (the last element) again, with VR 'AA' and a 64-byte value.
    mangled = data[:at] + b"\xe0\x7f\x10\x00AA" + b"\x40\x00" + value
    for call in (read_image, lambda d: decode_model_input(d)[0]):
        with pytest.raises(DicomRejected) as rejected:
            call(mangled)
        assert rejected.value.reason == "not_dicom"


def test_signed_monochrome1_stays_within_zero_one() -> None:
    """float32 rounding at the ends: the clipping check must use the image's own maths."""
    fmt = PixelFormat(bits_stored=8, signed=True, photometric="MONOCHROME1")
    buffer = io.BytesIO()
    stored = np.array([[-128, 127], [-127, 126]], dtype=np.int8)
    write_dicom(buffer, stored, fmt, "explicit_le", HEADER)
    for options in (DecodeOptions(), DecodeOptions(voi_index=None)):
        image = read_image(buffer.getvalue(), options)
        assert image.min() >= 0.0 and image.max() <= 1.0
