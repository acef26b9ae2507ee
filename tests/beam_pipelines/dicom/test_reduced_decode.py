"""Reduced-resolution decoding (JPEG 2000 levels, JPEG DCT scaling) against the full path."""

from __future__ import annotations

import csv
import io
import logging

import numpy as np
import pydicom
import pytest

from archive_tools.dicom_writer import PixelFormat, RadiographHeader, to_stored, write_dicom
from archive_tools.phantom import chest_phantom
from beam_pipelines.dicom import (
    DecodeOptions,
    DicomRejected,
    content_shape,
    decode,
    decode_model_input,
    pixel_map,
    reduced,
    to_model_input,
)
from beam_pipelines.dicom.resize import box_factor
from tests.support.data import DICOM_CORPUS, requires_corpus

HEADER = RadiographHeader(patient_id="P1", study_id="S1")
FULL = DecodeOptions(reduced_resolution=False)
MIN_CORRELATION = 0.995

requires_openjpeg = pytest.mark.skipif(
    not reduced.j2k_available(), reason="glymur has no OpenJPEG 2.4+ (system or Pillow's copy)"
)


def _radiograph(rows: int, cols: int, fmt: PixelFormat, encoding: str, seed: int = 0) -> bytes:
    display = chest_phantom(np.random.default_rng(seed), rows, cols, abnormal=True)
    buffer = io.BytesIO()
    write_dicom(buffer, to_stored(display, fmt), fmt, encoding, HEADER)
    return buffer.getvalue()


def _frame(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    return pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_codestream_header_is_read() -> None:
    fmt = PixelFormat(bits_stored=12, signed=True)
    info = reduced.read_codestream(_frame(_radiograph(300, 260, fmt, "j2k")))
    assert info is not None
    assert (info.rows, info.columns, info.components) == (300, 260, 1)
    assert (info.precision, info.signed) == (12, True)
    assert info.levels == 5  # OpenJPEG's default: 6 resolutions
    assert info.shape_at(0) == (300, 260)
    assert info.shape_at(3) == (38, 33)  # rounded up


def test_codestream_rejects_garbage() -> None:
    assert reduced.read_codestream(b"") is None
    assert reduced.read_codestream(b"\xff\x4f\xff\x51" + b"\x00" * 10) is None
    assert reduced.read_codestream(b"not a codestream at all" * 10) is None


@pytest.mark.parametrize(
    ("rows", "cols", "offsets", "level", "expected"),
    [
        (2500, 2047, (0, 0), 3, (313, 256)),
        (2001, 1999, (0, 0), 2, (501, 500)),
        (101, 101, (3, 0), 2, (25, 26)),  # an origin off the grid shifts the rounding
    ],
)
def test_shape_at_level_rounds_up(
    rows: int, cols: int, offsets: tuple[int, int], level: int, expected: tuple[int, int]
) -> None:
    info = reduced.Codestream(rows, cols, *offsets, 1, 12, False, levels=5)
    assert info.shape_at(level) == expected


def test_level_is_the_coarsest_still_at_least_the_target() -> None:
    info = reduced.Codestream(2500, 2048, 0, 0, 1, 12, False, levels=5)
    target = content_shape(2500, 2048)  # (224, 183)
    level = info.level_for(target)
    assert level == 3
    assert min(np.subtract(info.shape_at(level), target)) >= 0
    assert min(np.subtract(info.shape_at(level + 1), target)) < 0  # one more is too small
    few_levels = reduced.Codestream(2500, 2048, 0, 0, 1, 12, False, levels=1)
    assert few_levels.level_for(target) == 1
    assert info.level_for((2500, 2048)) == 0


@requires_openjpeg
@pytest.mark.parametrize(
    ("rows", "cols", "fmt"),
    [
        (1250, 1024, PixelFormat(bits_stored=12)),
        (1001, 999, PixelFormat(bits_stored=16, signed=True, rescale_intercept=-1024.0)),
        (
            999,
            1203,
            PixelFormat(
                bits_stored=12, photometric="MONOCHROME1", window_center=2000, window_width=3000
            ),
        ),
    ],
    ids=["12bit", "16bit_signed_rescale", "mono1_window"],
)
def test_j2k_reduced_matches_full_path(rows: int, cols: int, fmt: PixelFormat) -> None:
    data = _radiograph(rows, cols, fmt, "j2k")
    fast, fast_decoded = decode_model_input(data)
    full, full_decoded = decode_model_input(data, FULL)
    assert fast_decoded.route == "j2k_reduced" and fast_decoded.reduction >= 4
    # Every pixel decoded; the first box average of the resize done while
    # mapping, where the C kernel is built (else Pillow's resize does it all).
    boxed = box_factor(rows, cols, 224, "pad") if pixel_map.kernel_available() else 1
    assert full_decoded.route == "full" and full_decoded.reduction == boxed
    # Never decoded below the size the resize needs.
    assert min(np.subtract(fast_decoded.image.shape, content_shape(rows, cols))) >= 0
    assert _correlation(fast, full) >= MIN_CORRELATION
    assert np.abs(fast - full).mean() < 0.01
    # Same pipeline after the decode: geometry, padding, header, intensity mode.
    target = content_shape(rows, cols)
    top, left = (224 - target[0]) // 2, (224 - target[1]) // 2
    padding = np.ones(fast.shape, dtype=bool)
    padding[top : top + target[0], left : left + target[1]] = False
    assert not fast[padding].any() and not full[padding].any()
    assert fast_decoded.header == full_decoded.header
    assert (fast_decoded.intensity_source, fast_decoded.inverted) == (
        full_decoded.intensity_source,
        full_decoded.inverted,
    )


def _narrow_radiograph(
    rows: int, cols: int, fmt: PixelFormat, encoding: str, span: float, header_range: bool
) -> bytes:
    """A radiograph using ``span`` of the bit range, no window: scaled by its image range."""
    display = 0.4 + span * chest_phantom(np.random.default_rng(0), rows, cols, abnormal=True)
    stored = to_stored(display, fmt)
    extra = {}
    if header_range:
        extra = {
            "SmallestImagePixelValue": int(stored.min()),
            "LargestImagePixelValue": int(stored.max()),
        }
    buffer = io.BytesIO()
    header = RadiographHeader(patient_id="P1", study_id="S1", extra=extra)
    write_dicom(buffer, stored, fmt, encoding, header)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("encoding", "fmt", "span", "header_range", "path"),
    [
        pytest.param(
            "j2k", PixelFormat(bits_stored=16), 0.03, False, "j2k_reduced", marks=requires_openjpeg
        ),
        pytest.param(
            "j2k", PixelFormat(bits_stored=16), 0.03, True, "j2k_reduced", marks=requires_openjpeg
        ),
        ("jpeg_baseline", PixelFormat(bits_stored=8), 0.25, False, "jpeg_scaled"),
    ],
    ids=["j2k_percentiles", "j2k_image_range", "jpeg_percentiles"],
)
def test_reduced_paths_choose_the_full_paths_image_range(
    encoding: str, fmt: PixelFormat, span: float, header_range: bool, path: str
) -> None:
    """Same tolerances as the bit-range tests above: the range is (nearly) the same."""
    data = _narrow_radiograph(1250, 1024, fmt, encoding, span, header_range)
    fast, fast_decoded = decode_model_input(data)
    full, full_decoded = decode_model_input(data, FULL)
    assert fast_decoded.route == path and full_decoded.route == "full"
    mode = "image_range" if header_range else "percentiles"
    assert fast_decoded.intensity_source == full_decoded.intensity_source == mode
    # Full contrast inside the padding, where the bit range gives a near-flat image.
    rows, cols = content_shape(1250, 1024)
    left = (224 - cols) // 2
    flat, _ = decode_model_input(data, DecodeOptions(range_source="bit_range"))
    contrast = [image[:rows, left : left + cols].std() for image in (fast, full, flat)]
    assert min(contrast[:2]) > max(0.15, 3 * contrast[2])
    assert _correlation(fast, full) >= MIN_CORRELATION
    assert np.abs(fast - full).mean() < 0.01


def test_jpeg_scaled_matches_full_path() -> None:
    data = _radiograph(1500, 1203, PixelFormat(bits_stored=8), "jpeg_baseline")
    fast, fast_decoded = decode_model_input(data)
    full, full_decoded = decode_model_input(data, FULL)
    assert fast_decoded.route == "jpeg_scaled" and fast_decoded.reduction == 4
    assert fast_decoded.image.shape == (375, 301)
    assert full_decoded.route == "full"
    assert _correlation(fast, full) >= MIN_CORRELATION
    assert np.abs(fast - full).mean() < 0.01


def test_full_resolution_option_is_the_full_decode() -> None:
    data = _radiograph(600, 500, PixelFormat(bits_stored=12), "j2k")
    image, decoded = decode_model_input(data, FULL)
    assert decoded.route == "full"
    # Equal but for float32 rounding of the fused box average (2 ulps).
    np.testing.assert_allclose(image, to_model_input(decode(data).image), rtol=0, atol=2.4e-7)


@pytest.mark.parametrize("encoding", ["explicit_le", "jpegls", "rle"])
def test_other_syntaxes_take_the_full_path(encoding: str) -> None:
    data = _radiograph(600, 500, PixelFormat(bits_stored=12), encoding)
    image, decoded = decode_model_input(data)
    assert decoded.route == "full"
    assert np.array_equal(image, to_model_input(decode(data).image))


def test_small_image_is_decoded_in_full() -> None:
    # 300 px is less than 2 x 224: no level is both coarser and big enough.
    data = _radiograph(300, 260, PixelFormat(bits_stored=12), "j2k")
    _, decoded = decode_model_input(data)
    assert decoded.route == "full"


def test_missing_openjpeg_falls_back_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(reduced, "_j2k_state", {})
    monkeypatch.setattr(reduced, "_j2k_problem", lambda: "glymur cannot be imported")
    data = _radiograph(1000, 800, PixelFormat(bits_stored=12), "j2k")
    with caplog.at_level(logging.WARNING, logger="beam_pipelines.dicom.reduced"):
        first, decoded = decode_model_input(data)
        decode_model_input(data)
    assert decoded.route == "full"
    assert np.array_equal(first, decode_model_input(data, FULL)[0])
    warnings = [r for r in caplog.records if r.name == "beam_pipelines.dicom.reduced"]
    assert len(warnings) == 1 and "libopenjp2" in warnings[0].getMessage()


@requires_openjpeg
def test_fast_decoder_failure_falls_back_to_the_full_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(frame: bytes, level: int) -> np.ndarray:
        raise RuntimeError("OpenJPEG: tile decode failed")

    monkeypatch.setattr(reduced, "decode_j2k_level", broken)
    data = _radiograph(1000, 800, PixelFormat(bits_stored=12), "j2k")
    image, decoded = decode_model_input(data)
    assert decoded.route == "full"
    assert np.array_equal(image, decode_model_input(data, FULL)[0])


@requires_openjpeg
def test_corrupt_j2k_is_rejected_like_the_full_path() -> None:
    data = bytearray(_radiograph(1000, 800, PixelFormat(bits_stored=12), "j2k"))
    cut = len(data) // 2
    data[cut : cut + 4000] = b"\x00" * 4000  # wreck the code-blocks, keep the header
    outcomes = []
    for options in (DecodeOptions(), FULL):
        try:
            image, decoded = decode_model_input(bytes(data), options)
            outcomes.append(("ok", decoded.route))
            assert np.isfinite(image).all() and 0.0 <= image.min() <= image.max() <= 1.0
        except DicomRejected as rejected:
            outcomes.append(("rejected", rejected.reason))
    # Either both paths reject it the same way, or the fast path decoded it
    # (OpenJPEG may tolerate damage in fine levels it never reads).
    assert outcomes[0] == outcomes[1] or outcomes[0] == ("ok", "j2k_reduced")


def _corpus_candidates() -> list[dict[str, str]]:
    path = DICOM_CORPUS / "manifest.csv"
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    syntaxes = reduced.J2K_SYNTAXES | reduced.JPEG_SYNTAXES
    return [
        row
        for row in rows
        if row["ts_uid"] in syntaxes
        and row["photometric"] in ("MONOCHROME1", "MONOCHROME2")
        and row["decode_pydicom_pylibjpeg_gdcm"].startswith("ok")
    ]


RADIOGRAPHY = ("CR", "DX", "MG", "RG", "RF", "XA")


@requires_corpus
@requires_openjpeg
@pytest.mark.real_data
def test_real_corpus_fast_path_fidelity() -> None:
    """Every real J2K/JPEG grayscale file: same outcome, and the fast image tracks the full one.

    Radiographs must correlate >= 0.995 with the full path. CT and MR slices
    under a narrow window (sharp, saturated edges) reach 0.992-0.998: the
    coarse level is smoothed before the window clips, not after.
    """
    fast_radiographs = 0
    report = []
    for row in _corpus_candidates():
        path = str(DICOM_CORPUS / row["path"])
        try:
            full, full_decoded = decode_model_input(path, FULL)
        except DicomRejected as rejected:
            with pytest.raises(DicomRejected) as fast_rejected:
                decode_model_input(path)
            assert fast_rejected.value.reason == rejected.reason, row["path"]
            continue
        fast, fast_decoded = decode_model_input(path)
        assert fast_decoded.header == full_decoded.header, row["path"]
        assert fast_decoded.intensity_source == full_decoded.intensity_source, row["path"]
        if fast_decoded.route == "full":
            assert np.array_equal(fast, full), row["path"]
            continue
        correlation = _correlation(fast, full)
        report.append((row["path"], row["modality"], correlation, np.abs(fast - full).mean()))
        radiograph = row["modality"] in RADIOGRAPHY
        fast_radiographs += radiograph
        assert correlation >= (MIN_CORRELATION if radiograph else 0.99), report[-1]
    print("\n".join(f"{p} ({m}): r={r:.5f} mad={d:.5f}" for p, m, r, d in report))
    # The corpus holds real J2K radiographs big enough to reduce (CR, DX).
    assert fast_radiographs >= 5
