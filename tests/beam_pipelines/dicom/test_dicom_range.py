"""The image range: how beam_pipelines.dicom scales an image without a usable VOI.

A 16-bit image using a few percent of its bit range must come out with full
contrast, not flat mid-grey: by the header's Smallest / Largest Image Pixel
Value when they are true, else by the 0.5th / 99.5th percentiles of its
pixels. Windowed images must not change at all.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from archive_tools.dicom_writer import PixelFormat, RadiographHeader, build_dataset, to_stored
from archive_tools.phantom import chest_phantom
from beam_pipelines.dicom import DecodeOptions, decode, decode_model_input, pixel_map
from beam_pipelines.dicom.image_range import range_sample

HEADER = RadiographHeader(patient_id="P1", study_id="S1")
BIT_RANGE = DecodeOptions(range_source="bit_range")
SIXTEEN = PixelFormat(bits_stored=16)
# The line is applied in float32 (pixel_map): with a narrow 16-bit range its
# offset is ~-14, whose float32 rounding is ~1e-6.
ATOL = 4e-6


def _narrow(rows: int = 300, cols: int = 260, low: float = 0.40, span: float = 0.03) -> np.ndarray:
    """A chest phantom whose display values fill ``[low, low + span]`` of the range."""
    display = chest_phantom(np.random.default_rng(1), rows, cols, abnormal=True)
    return low + span * display


def _bytes(stored: np.ndarray, fmt: PixelFormat, **elements: object) -> bytes:
    ds = build_dataset(stored, fmt, "explicit_le", HEADER)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _scaled(stored: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((stored.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)


def _nearest_rank(values: np.ndarray, percent: float) -> float:
    ordered = np.sort(values.ravel())
    return float(ordered[max(0, int(np.ceil(ordered.size * percent / 100)) - 1)])


def test_narrow_sixteen_bit_image_gets_full_contrast_from_percentiles() -> None:
    stored = to_stored(_narrow(), SIXTEEN)
    data = _bytes(stored, SIXTEEN)
    flat = decode(data, BIT_RANGE)
    result = decode(data)
    assert (
        flat.intensity_source == "bit_range" and flat.image.std() < 0.01
    )  # the bug: flat mid-grey
    assert result.intensity_source == "percentiles"
    assert result.image.std() > 0.15
    # Nearly the same ramp as the bit range's, only stretched: 0.5% of the
    # sample's block means clip at each end (somewhat more of the noisier
    # single pixels).
    assert np.corrcoef(result.image.ravel(), flat.image.ravel())[0, 1] > 0.995
    assert 0.003 <= np.mean(result.image == 0.0) <= 0.03
    assert 0.003 <= np.mean(result.image == 1.0) <= 0.03
    # Exactly the nearest-rank percentiles of the sample: at 300 x 260, the
    # means of every 2 x 2 block.
    wide = stored.astype(np.float64)
    blocks = (wide[0::2, 0::2] + wide[1::2, 0::2] + wide[0::2, 1::2] + wide[1::2, 1::2]) / 4
    lo, hi = _nearest_rank(blocks, 0.5), _nearest_rank(blocks, 99.5)
    np.testing.assert_allclose(result.image, _scaled(stored, lo, hi), atol=ATOL)


def test_true_smallest_and_largest_pixel_values_are_the_range() -> None:
    stored = to_stored(_narrow(), SIXTEEN)
    small, large = int(stored.min()), int(stored.max())
    result = decode(
        _bytes(stored, SIXTEEN, SmallestImagePixelValue=small, LargestImagePixelValue=large)
    )
    assert result.intensity_source == "image_range"
    np.testing.assert_allclose(result.image, _scaled(stored, small, large), atol=ATOL)
    assert result.image.min() == 0.0 and result.image.max() == 1.0


def test_header_range_tolerates_a_lossy_overshoot() -> None:
    stored = to_stored(_narrow(), SIXTEEN)
    small, large = int(stored.min()), int(np.percentile(stored, 99.8))
    # 0.2% of the pixels above "Largest" (JPEG ringing, say): still believed.
    result = decode(
        _bytes(stored, SIXTEEN, SmallestImagePixelValue=small, LargestImagePixelValue=large)
    )
    assert result.intensity_source == "image_range"
    np.testing.assert_allclose(result.image, _scaled(stored, small, large), atol=ATOL)


@pytest.mark.parametrize(
    "case",
    ["largest_below_data", "largest_outside_bits", "smallest_not_below", "bit_range_echoed", "one"],
)
def test_untrue_header_range_falls_back_to_percentiles(case: str) -> None:
    fmt = PixelFormat(bits_stored=12) if case == "largest_outside_bits" else SIXTEEN
    stored = to_stored(_narrow(), fmt)
    small, large = int(stored.min()), int(stored.max())
    elements: dict[str, int] = {
        "largest_below_data": dict(
            SmallestImagePixelValue=small, LargestImagePixelValue=int(np.median(stored))
        ),
        "largest_outside_bits": dict(SmallestImagePixelValue=small, LargestImagePixelValue=5000),
        "smallest_not_below": dict(SmallestImagePixelValue=large, LargestImagePixelValue=large),
        # Some writers put the bit range there: true of no pixel, and flat grey.
        "bit_range_echoed": dict(SmallestImagePixelValue=0, LargestImagePixelValue=65535),
        "one": dict(LargestImagePixelValue=large),  # Smallest missing
    }[case]
    result = decode(_bytes(stored, fmt, **elements))
    assert result.intensity_source == "percentiles"
    assert np.array_equal(result.image, decode(_bytes(stored, fmt)).image)
    assert result.image.std() > 0.15


def test_signed_rescaled_image_range_goes_through_the_modality_lut() -> None:
    fmt = PixelFormat(bits_stored=16, signed=True, rescale_slope=0.5, rescale_intercept=-1024.0)
    stored = to_stored(_narrow(low=0.2), fmt)
    small, large = int(stored.min()), int(stored.max())
    assert small < 0  # negative stored values: SS in the header
    result = decode(
        _bytes(stored, fmt, SmallestImagePixelValue=small, LargestImagePixelValue=large)
    )
    assert result.intensity_source == "image_range"
    # A positive slope keeps the order: the same as scaling the stored values.
    np.testing.assert_allclose(result.image, _scaled(stored, small, large), atol=ATOL)
    # A negative slope flips the modality values and so the image (as with the bit range).
    flipped = decode(
        _bytes(
            stored,
            fmt,
            RescaleSlope=-0.5,
            SmallestImagePixelValue=small,
            LargestImagePixelValue=large,
        )
    )
    np.testing.assert_allclose(flipped.image, 1.0 - _scaled(stored, small, large), atol=ATOL)


def test_monochrome1_is_still_inverted() -> None:
    display = _narrow()
    mono2 = to_stored(display, SIXTEEN)
    mono1_fmt = PixelFormat(bits_stored=16, photometric="MONOCHROME1")
    mono1 = to_stored(display, mono1_fmt)
    for extra in ({}, {"SmallestImagePixelValue": 0}):  # percentiles; Largest missing too
        two = decode(_bytes(mono2, SIXTEEN, **extra))
        one = decode(_bytes(mono1, mono1_fmt, **extra))
        assert (
            one.inverted
            and not two.inverted
            and one.intensity_source == two.intensity_source == "percentiles"
        )
        # Same display image: MONOCHROME1 stores 1 - display, and is inverted back.
        assert np.abs(one.image - two.image).mean() < 0.01
    small, large = int(mono1.min()), int(mono1.max())
    one = decode(
        _bytes(mono1, mono1_fmt, SmallestImagePixelValue=small, LargestImagePixelValue=large)
    )
    assert one.intensity_source == "image_range"
    np.testing.assert_allclose(one.image, 1.0 - _scaled(mono1, small, large), atol=ATOL)


@pytest.mark.parametrize("value", [0, 1000, 4095])
def test_constant_and_near_constant_images_are_defined(value: int) -> None:
    fmt = PixelFormat(bits_stored=12)
    rng = np.random.default_rng(value)
    blank = np.full((64, 64), value, dtype=np.uint16)
    result = decode(_bytes(blank, fmt))
    assert result.intensity_source == "percentiles" and np.isfinite(result.image).all()
    assert len(np.unique(result.image)) == 1
    expected = {0: 0.0, 1000: 0.5, 4095: 1.0}[value]
    np.testing.assert_allclose(result.image, expected, atol=ATOL)
    # Noise of +-3 levels is not stretched to full contrast: the range spans
    # at least 1/64 of the bit range (64 levels at 12 bits).
    noisy = np.clip(value + rng.integers(-3, 4, size=(64, 64)), 0, 4095).astype(np.uint16)
    image = decode(_bytes(noisy, fmt)).image
    assert np.isfinite(image).all() and image.max() - image.min() <= 6 / 63 + 1e-6
    # Also a constant header range (Smallest == Largest): refused, still defined.
    same = decode(_bytes(blank, fmt, SmallestImagePixelValue=value, LargestImagePixelValue=value))
    assert same.intensity_source == "percentiles"
    assert np.array_equal(same.image, result.image)


def test_minimum_span_never_reaches_past_the_bit_range() -> None:
    fmt = PixelFormat(bits_stored=16)
    near_top = np.full((32, 32), 65530, dtype=np.uint16)
    near_top[::2] = 65535
    image = decode(_bytes(near_top, fmt)).image
    # The range is [65535 - 1024, 65535]: 65530 sits just below white.
    np.testing.assert_allclose(image[1::2], 1 - 5 / 1024, atol=1e-5)
    assert np.all(image[::2] == 1.0)


def _windowed_cases() -> list:
    stored = to_stored(_narrow(low=0.3, span=0.4), SIXTEEN)
    first, entries = int(stored.min()), int(stored.max() - stored.min()) + 1
    lut = Dataset()
    lut.LUTDescriptor = [entries, first, 16]
    lut.LUTData = (np.linspace(0, 1, entries) ** 0.5 * 65535).astype("<u2").tobytes()
    center = float(np.median(stored))
    window: dict[str, object] = dict(WindowCenter=center, WindowWidth=8000.0)
    cases: dict[str, dict[str, object]] = {
        "window": window,
        "sigmoid": dict(window, VOILUTFunction="SIGMOID"),
        "voi_lut": dict(VOILUTSequence=Sequence([lut])),
        "window_and_header_range": dict(
            window, SmallestImagePixelValue=first, LargestImagePixelValue=int(stored.max())
        ),
    }
    return [
        pytest.param(name, _bytes(stored, SIXTEEN, **els), id=name) for name, els in cases.items()
    ]


@pytest.mark.parametrize(("name", "data"), _windowed_cases())
def test_windowed_images_are_unchanged(name: str, data: bytes) -> None:
    default, old = decode(data), decode(data, BIT_RANGE)
    assert (
        default.intensity_source
        == old.intensity_source
        == ("voi_lut" if name == "voi_lut" else "window")
    )
    assert np.array_equal(default.image, old.image)
    model, _ = decode_model_input(data)
    assert np.array_equal(model, decode_model_input(data, BIT_RANGE)[0])


def test_image_range_keeps_the_one_pass_line(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[float, float]] = []
    affine = pixel_map.affine

    def spy(
        stored: np.ndarray, scale: float, offset: float, bits_stored: int | None = None
    ) -> np.ndarray:
        calls.append((scale, offset))
        return affine(stored, scale, offset, bits_stored)

    monkeypatch.setattr(pixel_map, "affine", spy)
    stored = to_stored(_narrow(), SIXTEEN)
    small, large = int(stored.min()), int(stored.max())
    for extra in ({}, {"SmallestImagePixelValue": small, "LargestImagePixelValue": large}):
        calls.clear()
        decode(_bytes(stored, SIXTEEN, **extra))
        assert len(calls) == 1  # the clipped line, not the 65,536-entry table
    assert calls[0][0] == pytest.approx(1 / (large - small))


def test_range_sample_averages_two_by_two_blocks() -> None:
    # A 1-pixel grid on odd rows and columns: single pixels on even ones would
    # see none of it, a reduced-resolution decode sees a quarter of it.
    stored = np.zeros((512, 512), dtype=np.uint16)
    stored[1::2, 1::2] = 400
    values = range_sample(stored, None)
    assert values.shape == (128, 128) and np.all(values == 100.0)
    # Blocks at every 19th / 16th row / column of a radiograph, inside the image.
    assert range_sample(np.zeros((2500, 2048), np.uint16), None).shape == (132, 128)
    # Too small to stride: every pixel itself.
    small = np.arange(12, dtype=np.uint16).reshape(3, 4)
    assert np.array_equal(range_sample(small, None), small)


def test_range_sample_cleans_unused_high_bits() -> None:
    stored = np.full((8, 8), 0xF000 | 100, dtype=">u2")  # big endian, junk in bits 12-15
    values = range_sample(stored, 12)
    assert values.dtype.isnative and np.all(values == 100)
    # Signed 12-bit -1 as it may sit in 16 bits: sign-extended from bit 12.
    signed = np.full((8, 8), 0x0FFF, dtype="<i2")
    assert np.all(range_sample(signed, 12) == -1)


def test_range_source_is_validated() -> None:
    with pytest.raises(ValueError, match="range_source"):
        DecodeOptions(range_source="percentiles")  # type: ignore[arg-type]
    assert DecodeOptions().range_source == "image"
