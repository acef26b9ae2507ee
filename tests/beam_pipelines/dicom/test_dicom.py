"""beam_pipelines.dicom on generated files whose true pixels are known."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from archive_tools.dicom_writer import (
    LOSSLESS_ENCODINGS,
    PixelFormat,
    RadiographHeader,
    build_dataset,
    from_stored,
    to_stored,
    write_dicom,
)
from beam_pipelines.dicom import (
    DecodeOptions,
    DicomRejected,
    decode,
    read_dataset,
    read_header,
    read_image,
    to_model_input,
)

HEADER = RadiographHeader(
    patient_id="P000001",
    study_id="S0001",
    view_position="PA",
    patient_age=65,
    patient_sex="F",
    patient_name="SYNTH^P000001",
    pixel_spacing=(0.15, 0.16),
)


def _truth(rows: int = 40, cols: int = 56) -> np.ndarray:
    """A smooth display image using the whole [0, 1] range, plus a bright disc."""
    y, x = np.mgrid[0:rows, 0:cols]
    image = (x / (cols - 1)) * 0.8 + (y / (rows - 1)) * 0.2
    image[(y - rows / 2) ** 2 + (x - cols / 3) ** 2 < (rows / 5) ** 2] = 1.0
    return image.astype(np.float32)


def _file(stored: np.ndarray, fmt: PixelFormat, encoding: str = "explicit_le") -> bytes:
    buffer = io.BytesIO()
    write_dicom(buffer, stored, fmt, encoding, HEADER)
    return buffer.getvalue()


def _dataset_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR, output in [0, 1]."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


# Decoding-correctness tests compare with from_stored(), the bit-range truth;
# the image range (the default) has its own tests in test_dicom_range.py.
BIT_RANGE = DecodeOptions(range_source="bit_range")


FORMATS = {
    "12bit": PixelFormat(bits_stored=12),
    "16bit_mono1": PixelFormat(bits_stored=16, photometric="MONOCHROME1"),
    "8bit": PixelFormat(bits_stored=8),
    "10bit_signed": PixelFormat(bits_stored=10, signed=True),
    "12bit_rescale": PixelFormat(bits_stored=12, rescale_slope=0.5, rescale_intercept=-1024),
    "14bit_signed_mono1_rescale": PixelFormat(
        bits_stored=14, signed=True, photometric="MONOCHROME1", rescale_slope=2.0
    ),
}


@pytest.mark.parametrize("encoding", LOSSLESS_ENCODINGS)
@pytest.mark.parametrize("name", FORMATS)
def test_lossless_decode_matches_truth(encoding: str, name: str) -> None:
    fmt = FORMATS[name]
    truth = _truth()
    stored = to_stored(truth, fmt)
    result = decode(_file(stored, fmt, encoding), BIT_RANGE)
    assert result.image.dtype == np.float32
    assert result.image.shape == truth.shape
    assert result.intensity_source == "bit_range"
    assert result.inverted == (fmt.photometric == "MONOCHROME1")
    np.testing.assert_allclose(result.image, from_stored(stored, fmt), atol=1e-6)
    # Quantization to the stored bit depth is the only loss.
    assert np.abs(result.image - truth).max() <= 0.5 / (2**fmt.bits_stored - 1) + 1e-6


def test_jpeg_baseline_is_close_to_truth() -> None:
    fmt = PixelFormat(bits_stored=8)
    truth = _truth(64, 64)
    image = read_image(_file(to_stored(truth, fmt), fmt, "jpeg_baseline"), BIT_RANGE)
    assert np.abs(image - truth).mean() < 2 / 255


def test_twelve_bit_depth_is_kept() -> None:
    fmt = PixelFormat(bits_stored=12)
    ramp = np.tile(np.linspace(0, 1, 4096, dtype=np.float32), (2, 1))
    data = _file(to_stored(ramp, fmt), fmt)
    assert len(np.unique(read_image(data, BIT_RANGE))) == 4096
    # The image range clips the 0.5% tails and keeps every level between.
    assert len(np.unique(read_image(data))) >= 0.97 * 4096


@pytest.mark.parametrize(("value", "in_image_range"), [(0.0, 0.0), (0.37, 0.5), (1.0, 1.0)])
def test_blank_image_does_not_divide_by_zero(value: float, in_image_range: float) -> None:
    fmt = PixelFormat(bits_stored=12)
    data = _file(to_stored(np.full((16, 16), value, np.float32), fmt), fmt)
    image = read_image(data, BIT_RANGE)
    assert np.isfinite(image).all()
    np.testing.assert_allclose(image, value, atol=1e-3)
    # The image range's minimum span is centred on the value, inside the bit
    # range: black stays black, white white, anything else mid-grey.
    result = decode(data)
    assert result.intensity_source == "percentiles" and np.isfinite(result.image).all()
    np.testing.assert_allclose(result.image, in_image_range, atol=1e-6)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_window_applies_after_rescale_then_inversion(photometric: str) -> None:
    fmt = PixelFormat(
        bits_stored=12,
        photometric=photometric,
        rescale_slope=0.5,
        rescale_intercept=-100.0,
        window_center=600.0,
        window_width=900.0,
    )
    stored = to_stored(_truth(), fmt)
    result = decode(_file(stored, fmt))
    expected = _linear_window(stored * 0.5 - 100.0, 600.0, 900.0)
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    assert result.intensity_source == "window"
    np.testing.assert_allclose(result.image, expected, atol=1e-6)
    # The window wins over the image range: the same pixels either way.
    assert np.array_equal(result.image, read_image(_file(stored, fmt), BIT_RANGE))
    # Ignoring VOI gives the bit-range result instead.
    plain = read_image(_file(stored, fmt), DecodeOptions(voi_index=None, range_source="bit_range"))
    np.testing.assert_allclose(plain, from_stored(stored, fmt), atol=1e-6)
    assert (
        decode(_file(stored, fmt), DecodeOptions(voi_index=None)).intensity_source == "percentiles"
    )


def test_second_window_and_sigmoid_function() -> None:
    fmt = PixelFormat(bits_stored=12)
    stored = to_stored(_truth(), fmt)
    ds = build_dataset(stored, fmt, "explicit_le", HEADER)
    ds.WindowCenter = [1000, 2000]
    ds.WindowWidth = [500, 1000]
    ds.VOILUTFunction = "SIGMOID"
    data = _dataset_bytes(ds)
    image = read_image(data, DecodeOptions(voi_index=1))
    expected = 1.0 / (1.0 + np.exp(-4.0 * (stored - 2000.0) / 1000.0))
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_window_that_misses_the_image_is_ignored() -> None:
    fmt = PixelFormat(bits_stored=16, window_center=100.0, window_width=50.0)
    truth = 0.6 + 0.3 * _truth()  # every modality value far above the window
    stored = to_stored(truth, fmt)
    result = decode(_file(stored, fmt), BIT_RANGE)
    assert result.intensity_source == "window_ignored"
    np.testing.assert_allclose(result.image, from_stored(stored, fmt), atol=1e-6)
    # By default the image is then scaled by its own range, like one without
    # a window: the 30% of the bit range it uses becomes full contrast.
    own = decode(_file(stored, fmt))
    assert own.intensity_source == "window_ignored"
    assert own.image.min() == 0.0 and own.image.max() == 1.0
    assert own.image.std() > 2.5 * result.image.std()
    assert np.corrcoef(own.image.ravel(), truth.ravel())[0, 1] > 0.99


def test_modality_lut_sequence_and_voi_lut_sequence() -> None:
    fmt = PixelFormat(bits_stored=8)
    stored = to_stored(_truth(), fmt)
    ds = build_dataset(stored, fmt, "explicit_le", HEADER)
    modality_table = (np.arange(256, dtype=np.uint16) * 3 + 10).astype("<u2")
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = modality_table.tobytes()
    ds.ModalityLUTSequence = Sequence([item])
    data = _dataset_bytes(ds)
    image = read_image(data, BIT_RANGE)
    # Range comes from the table: (3*s + 10 - 10) / (3*255).
    np.testing.assert_allclose(image, stored / 255.0, atol=1e-6)

    voi_item = Dataset()
    voi_item.LUTDescriptor = [500, 200, 16]  # maps modality values 200..699
    voi_item.LUTData = (np.arange(500, dtype=np.uint16) * 100).astype("<u2").tobytes()
    ds.VOILUTSequence = Sequence([voi_item])
    image = read_image(_dataset_bytes(ds))
    modality = stored.astype(np.float64) * 3 + 10
    expected = np.clip(modality - 200, 0, 499) / 499
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_multiframe_first_frame_or_reject() -> None:
    fmt = PixelFormat(bits_stored=12)
    frames = np.stack([to_stored(_truth(), fmt), to_stored(1 - _truth(), fmt)])
    ds = build_dataset(frames[0], fmt, "explicit_le", HEADER)
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    data = _dataset_bytes(ds)
    np.testing.assert_allclose(read_image(data, BIT_RANGE), from_stored(frames[0], fmt), atol=1e-6)
    with pytest.raises(DicomRejected) as rejected:
        read_image(data, DecodeOptions(multiframe="reject"))
    assert rejected.value.reason == "multi_frame"


def _rgb_dataset(rgb: np.ndarray) -> Dataset:
    fmt = PixelFormat(bits_stored=8)
    ds = build_dataset(rgb[..., 0].copy(), fmt, "explicit_le", HEADER)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelData = rgb.astype(np.uint8).tobytes()
    return ds


def test_gray_saved_as_rgb_is_accepted_real_colour_rejected() -> None:
    gray = (_truth() * 255).round().astype(np.uint8)
    data = _dataset_bytes(_rgb_dataset(np.stack([gray] * 3, axis=-1)))
    result = decode(data)
    assert result.color_converted
    np.testing.assert_allclose(result.image, gray / 255.0, atol=1e-5)

    colour = np.stack([gray, 255 - gray, np.zeros_like(gray)], axis=-1)
    data = _dataset_bytes(_rgb_dataset(colour))
    with pytest.raises(DicomRejected) as rejected:
        read_image(data)
    assert rejected.value.reason == "unsupported_photometric"
    assert read_image(data, DecodeOptions(color="luminance")).shape == gray.shape
    with pytest.raises(DicomRejected):
        read_image(
            _dataset_bytes(_rgb_dataset(np.stack([gray] * 3, -1))), DecodeOptions(color="reject")
        )


# ---------------------------------------------------------------- rejects


def _valid_file() -> bytes:
    fmt = PixelFormat(bits_stored=12)
    return _file(to_stored(_truth(), fmt), fmt)


def _edited(**changes: object) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_valid_file()))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return _dataset_bytes(ds)


def _unknown_syntax() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_valid_file()))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
    buffer = io.BytesIO()
    # Written as explicit little endian, labelled with a syntax nobody knows.
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: b"", "empty_file"),
        (lambda: b"hello, I am a text file\n" * 20, "not_dicom"),
        (lambda: b"\x89PNG\r\n\x1a\n" + bytes(200), "not_dicom"),
        (lambda: _valid_file()[:-1500], "truncated"),
        (lambda: _valid_file()[:200], "truncated"),
        (lambda: _edited(PixelData=None), "no_pixel_data"),
        (lambda: _edited(Rows=400), "pixel_length_mismatch"),
        (lambda: _edited(Rows=60000, Columns=60000), "too_large"),
        (lambda: _edited(PhotometricInterpretation="CMYK"), "unsupported_photometric"),
        (lambda: _edited(SamplesPerPixel=4), "unsupported_pixel_format"),
        (lambda: _edited(Rows=0), "no_pixel_data"),
        (_unknown_syntax, "unsupported_transfer_syntax"),
    ],
    ids=[
        "empty",
        "text",
        "png",
        "cut_in_pixels",
        "cut_in_header",
        "no_pixels",
        "short_pixels",
        "lying_size",
        "cmyk",
        "four_samples",
        "zero_rows",
        "unknown_syntax",
    ],
)
def test_bad_input_is_rejected_with_reason(make, reason: str) -> None:
    with pytest.raises(DicomRejected) as rejected:
        read_image(make())
    assert rejected.value.reason == reason
    assert "P000001" not in str(rejected.value)  # no PHI in the detail


def test_corrupt_compressed_stream_is_rejected() -> None:
    fmt = PixelFormat(bits_stored=12)
    ds = build_dataset(to_stored(_truth(), fmt), fmt, "j2k", HEADER)
    # Same fragment length, but the codestream is noise (no J2K markers).
    fragment = bytes(np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8))
    ds.PixelData = pydicom.encaps.encapsulate([fragment])
    with pytest.raises(DicomRejected) as rejected:
        read_image(_dataset_bytes(ds))
    assert rejected.value.reason == "decode_failed"


def test_paths_are_read_and_missing_paths_rejected(tmp_path: Path) -> None:
    path = tmp_path / "image.dcm"
    path.write_bytes(_valid_file())
    assert read_image(str(path)).shape == (40, 56)
    with path.open("rb") as handle:
        assert read_image(handle).shape == (40, 56)
    with pytest.raises(DicomRejected) as missing:
        read_image(str(tmp_path / "absent.dcm"))
    assert missing.value.reason == "missing_file"
    with pytest.raises(DicomRejected) as directory:
        read_image(str(tmp_path))
    assert directory.value.reason in {"unreadable", "missing_file"}


def test_rejection_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(DicomRejected("truncated", "cut")))
    assert (error.reason, error.detail) == ("truncated", "cut")
    with pytest.raises(ValueError):
        DicomRejected("no_such_reason", "x")


def test_read_header_fields() -> None:
    header = read_header(read_dataset(_valid_file()))
    assert (header.rows, header.columns, header.bits_stored) == (40, 56, 12)
    assert header.photometric_interpretation == "MONOCHROME2"
    assert header.transfer_syntax_uid == pydicom.uid.ExplicitVRLittleEndian
    assert header.view_position == "PA"
    assert header.patient_age == 65 and header.patient_sex == "F"
    assert header.pixel_spacing == (0.15, 0.16)
    assert header.sop_instance_uid == HEADER.uids()[2]
    assert header.as_dict()["modality"] == "DX"


def test_malformed_optional_header_values_become_unknown() -> None:
    header = read_header(read_dataset(_edited(PatientAge="abc", PatientSex="X")))
    assert header.patient_age is None and header.patient_sex is None


# ---------------------------------------------------------------- model input


def test_model_input_pads_and_keeps_aspect() -> None:
    image = np.ones((100, 200), np.float32)
    out = to_model_input(image)
    assert out.shape == (224, 224, 1) and out.dtype == np.float32
    # 100x200 -> 112x224 centred: 56 black rows above and below.
    assert out[:56].max() == 0.0 and out[-56:].max() == 0.0
    np.testing.assert_allclose(out[56:168], 1.0, atol=1e-6)


def test_model_input_stretch_and_range() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((300, 150)).astype(np.float32)
    out = to_model_input(image, size=64, policy="stretch")
    assert out.shape == (64, 64, 1)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert abs(out.mean() - image.mean()) < 0.01  # antialiased: averages, no aliasing


def test_model_input_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        to_model_input(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        to_model_input(np.zeros((4, 4), np.float32), policy="crop")  # type: ignore[arg-type]


def test_decode_options_validate() -> None:
    with pytest.raises(ValueError):
        DecodeOptions(multiframe="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DecodeOptions(voi_index=-1)


@pytest.mark.parametrize("signed", [False, True])
def test_unused_high_bits_are_ignored(signed: bool) -> None:
    """Bits above BitsStored (overlays, garbage) must not change the image."""
    fmt = PixelFormat(bits_stored=12, signed=signed)
    stored = to_stored(_truth(), fmt)
    clean = read_image(_file(stored, fmt))
    ds = build_dataset(stored, fmt, "explicit_le", HEADER)
    noisy = stored.view(np.uint16) | np.uint16(0xA000)  # set bits 13 and 15
    ds.PixelData = noisy.astype("<u2").tobytes()
    np.testing.assert_array_equal(read_image(_dataset_bytes(ds)), clean)


_LEAK_PROBE = """
import logging, sys
import pydicom.config, pydicom.valuerep
from beam_pipelines.dicom import decode
from beam_pipelines.privacy import install_log_filters
logging.basicConfig(level=logging.DEBUG)
install_log_filters()
decode(sys.stdin.buffer.read())
pydicom.valuerep.validate_value("AS", "SECRETAGE", pydicom.config.WARN)
"""


def test_pydicom_messages_about_header_values_do_not_leak_them(tmp_path: Path) -> None:
    """pydicom's validation warnings quote the offending value: a name or ID is PHI.

    Run in a fresh interpreter: pytest replaces the warning filters of tests.
    """
    image = _truth(8, 8).astype(np.uint16)
    ds = build_dataset(image, PixelFormat(bits_stored=12), "explicit_le", HEADER)
    ds.PatientID = "SECRETPATIENT" * 6  # longer than LO allows: pydicom complains
    done = subprocess.run(
        [sys.executable, "-c", _LEAK_PROBE],
        input=_dataset_bytes(ds),
        capture_output=True,
        check=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    stderr = done.stderr.decode()
    assert "exceeds the maximum length" in stderr  # pydicom did complain
    assert "Invalid value for VR AS: …" in stderr  # ... with the value blanked
    assert "SECRET" not in stderr and "SECRET" not in done.stdout.decode()
