from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    SecondaryCaptureImageStorage,
)

from archive_tools.dicom_writer import (
    ENCODINGS,
    LOSSLESS_ENCODINGS,
    PixelFormat,
    RadiographHeader,
    from_stored,
    to_stored,
    write_dicom,
)

FORMATS = {
    "u8": PixelFormat(8),
    "u12": PixelFormat(12),
    "u16": PixelFormat(16),
    "mono1_12": PixelFormat(12, "MONOCHROME1"),
    "s12": PixelFormat(12, signed=True),
    "s16_mono1": PixelFormat(16, "MONOCHROME1", signed=True),
    "s8": PixelFormat(8, signed=True),
    "rescale_window_10": PixelFormat(
        10, rescale_slope=0.5, rescale_intercept=-1024.0, window_center=-770.0, window_width=460.0
    ),
    "slope2_14": PixelFormat(14, rescale_slope=2.0),
    "mono1_u8_window": PixelFormat(8, "MONOCHROME1", window_center=127.5, window_width=230.0),
}
CASES = [
    (enc, name)
    for enc in ENCODINGS
    for name, fmt in FORMATS.items()
    if enc != "jpeg_baseline" or (fmt.bits_stored == 8 and not fmt.signed)
]
HEADER = RadiographHeader(
    patient_id="P000123",
    study_id="S0001",
    view_position="AP",
    modality="DX",
    patient_age=65,
    patient_sex="F",
    patient_name="SYNTH^P000123",
    pixel_spacing=(0.143, 0.15),
)


def _roundtrip(stored, fmt, encoding, header=HEADER) -> tuple[bytes, pydicom.Dataset]:
    buffer = io.BytesIO()
    write_dicom(buffer, stored, fmt, encoding, header)
    data = buffer.getvalue()
    return data, pydicom.dcmread(io.BytesIO(data))


@pytest.mark.parametrize(("encoding", "fmt_name"), CASES)
def test_write_read_roundtrip(encoding, fmt_name, smooth_display):
    fmt = FORMATS[fmt_name]
    stored = to_stored(smooth_display, fmt)
    data, ds = _roundtrip(stored, fmt, encoding)

    assert data[128:132] == b"DICM"
    assert ds.file_meta.TransferSyntaxUID == ENCODINGS[encoding]
    assert ds.file_meta.MediaStorageSOPClassUID == DigitalXRayImageStorageForPresentation
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == DigitalXRayImageStorageForPresentation
    assert ds.StudyInstanceUID and ds.SeriesInstanceUID and ds.SOPInstanceUID
    assert (ds.Rows, ds.Columns) == stored.shape
    assert ds.BitsStored == fmt.bits_stored
    assert ds.BitsAllocated == (8 if fmt.bits_stored <= 8 else 16)
    assert ds.HighBit == fmt.bits_stored - 1
    assert ds.PhotometricInterpretation == fmt.photometric
    assert ds.PixelRepresentation == int(fmt.signed)
    assert ds.SamplesPerPixel == 1
    assert ds.PatientAge == "065Y"
    assert ds.PatientID == "P000123"
    assert ds.PatientSex == "F"
    assert ds.StudyID == "S0001"
    assert ds.ViewPosition == "AP"
    assert ds.BodyPartExamined == "CHEST"
    assert [float(v) for v in ds.PixelSpacing] == [0.143, 0.15]
    if fmt.has_rescale:
        assert float(ds.RescaleSlope) == fmt.rescale_slope
        assert float(ds.RescaleIntercept) == fmt.rescale_intercept
        assert ds.RescaleType == "US"
    else:
        assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds
    if fmt.has_window:
        assert float(ds.WindowCenter) == fmt.window_center
        assert float(ds.WindowWidth) == fmt.window_width
    else:
        assert "WindowCenter" not in ds and "WindowWidth" not in ds

    pixels = ds.pixel_array
    if encoding in LOSSLESS_ENCODINGS:
        assert ds.LossyImageCompression == "00"
        np.testing.assert_array_equal(pixels, stored)
    else:
        assert ds.LossyImageCompression == "01"
        assert np.abs(pixels.astype(float) - stored.astype(float)).mean() < 2.0


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_from_stored_inverts_to_stored(fmt_name, smooth_display):
    fmt = FORMATS[fmt_name]
    stored = to_stored(smooth_display, fmt)
    smin, smax = fmt.stored_range
    assert stored.dtype == fmt.dtype
    assert stored.min() == smin and stored.max() == smax  # The full range is used.
    back = from_stored(stored, fmt)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, smooth_display, atol=0.5 / (smax - smin) + 1e-6)


def test_to_stored_convention_exact_values():
    display = np.array([[0.0, 0.5, 1.0]])
    np.testing.assert_array_equal(to_stored(display, PixelFormat(12)), [[0, 2048, 4095]])
    np.testing.assert_array_equal(
        to_stored(display, PixelFormat(12, "MONOCHROME1")), [[4095, 2048, 0]]
    )
    np.testing.assert_array_equal(
        to_stored(display, PixelFormat(12, signed=True)), [[-2048, 0, 2047]]
    )
    # Out-of-range display values are clipped; rescale never changes stored values.
    np.testing.assert_array_equal(
        to_stored(np.array([[-1.0, 2.0]]), PixelFormat(8, rescale_slope=2.0)), [[0, 255]]
    )


def test_big_endian_bytes_on_disk(smooth_display):
    fmt = PixelFormat(16)
    stored = to_stored(smooth_display, fmt)
    data, ds = _roundtrip(stored, fmt, "big_endian")
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    # PixelData is the last element, so its value is the end of the file.
    tail = data[-stored.size * 2 :]
    assert tail == stored.astype(">u2").tobytes()
    assert tail != stored.astype("<u2").tobytes()
    np.testing.assert_array_equal(ds.pixel_array, stored)


def test_write_to_path_and_sop_classes(tmp_path, smooth_display):
    fmt = PixelFormat(8)
    stored = to_stored(smooth_display, fmt)
    expected = {
        "DX": DigitalXRayImageStorageForPresentation,
        "CR": ComputedRadiographyImageStorage,
        "OT": SecondaryCaptureImageStorage,
    }
    for modality, sop_class in expected.items():
        path = tmp_path / f"{modality}.dcm"
        header = RadiographHeader("P1", "S1", modality=modality, view_position="LATERAL")
        write_dicom(path, stored, fmt, "explicit_le", header)
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == sop_class
        assert ds.Modality == modality
        assert ds.PatientAge == ""
        assert ds.PatientSex == ""


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_same_input_same_bytes(encoding, smooth_display):
    fmt = PixelFormat(8)
    stored = to_stored(smooth_display, fmt)
    first, ds = _roundtrip(stored, fmt, encoding)
    second, _ = _roundtrip(stored, fmt, encoding)
    assert first == second
    assert ds.SOPInstanceUID == HEADER.uids()[2]


def test_uids_are_deterministic_and_distinct(smooth_display):
    fmt = PixelFormat(12)
    stored = to_stored(smooth_display, fmt)
    _, ds1 = _roundtrip(stored, fmt, "explicit_le")
    other = RadiographHeader("P000123", "S0001", instance_number=2)
    _, ds3 = _roundtrip(stored, fmt, "explicit_le", other)
    assert ds3.StudyInstanceUID == ds1.StudyInstanceUID
    assert ds3.SOPInstanceUID != ds1.SOPInstanceUID
    seeded = RadiographHeader("P000123", "S0001", uid_seed="another archive")
    _, ds4 = _roundtrip(stored, fmt, "explicit_le", seeded)
    assert ds4.StudyInstanceUID != ds1.StudyInstanceUID
    given = RadiographHeader("P1", "S1", sop_instance_uid="1.2.3.4", study_instance_uid="1.2.3")
    _, ds5 = _roundtrip(stored, fmt, "explicit_le", given)
    assert (ds5.SOPInstanceUID, ds5.StudyInstanceUID) == ("1.2.3.4", "1.2.3")
    assert ds5.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"


def test_extra_fields_are_written(smooth_display):
    fmt = PixelFormat(12)
    header = RadiographHeader("P1", "S1", extra={"Manufacturer": "ACME", "InstitutionName": "X"})
    _, ds = _roundtrip(to_stored(smooth_display, fmt), fmt, "explicit_le", header)
    assert ds.Manufacturer == "ACME"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits_stored": 7},
        {"bits_stored": 17},
        {"photometric": "RGB"},
        {"rescale_slope": 0.0},
        {"rescale_slope": -1.0},
        {"rescale_intercept": float("nan")},
        {"window_center": 10.0},
        {"window_center": 10.0, "window_width": 0.0},
    ],
)
def test_pixel_format_validation(kwargs):
    with pytest.raises(ValueError):
        PixelFormat(**kwargs)


@pytest.mark.parametrize(
    ("stored", "fmt", "encoding"),
    [
        (np.full((4, 4), 4096, np.uint16), PixelFormat(12), "explicit_le"),
        (np.full((4, 4), -1, np.int16), PixelFormat(12), "explicit_le"),
        (np.zeros((4, 4), np.uint16), PixelFormat(12), "jpeg_baseline"),
        (np.zeros((4, 4), np.int8), PixelFormat(8, signed=True), "jpeg_baseline"),
        (np.zeros((4, 4), np.uint8), PixelFormat(8), "mpeg"),
        (np.zeros((2, 4, 4), np.uint8), PixelFormat(8), "explicit_le"),
        (np.zeros((4, 4), np.float32), PixelFormat(8), "explicit_le"),
    ],
)
def test_write_rejects_bad_input(stored, fmt, encoding):
    with pytest.raises(ValueError):
        write_dicom(io.BytesIO(), stored, fmt, encoding, HEADER)


def test_header_validation():
    with pytest.raises(ValueError):
        RadiographHeader("P1", "S" * 17)
    with pytest.raises(ValueError):
        RadiographHeader("P1", "S1", modality="MR")
    with pytest.raises(ValueError):
        RadiographHeader("P1", "S1", patient_age=1000)
