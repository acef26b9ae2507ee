"""The one-pass pixel mapping: C kernel and numpy fallback agree to the bit."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sysconfig

import numpy as np
import pytest

from beam_pipelines import dicom
from beam_pipelines.dicom import pixel_map
from beam_pipelines.dicom.resize import box_factor
from tests.support.data import REPO

needs_kernel = pytest.mark.skipif(
    not pixel_map.kernel_available(), reason="the C kernel is not built"
)


@pytest.fixture
def numpy_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pixel_map, "_kernels", None)


def _truth(values: np.ndarray, scale: float, offset: float) -> np.ndarray:
    image = values.astype(np.float32) * np.float32(scale) + np.float32(offset)
    return np.clip(image, np.float32(0), np.float32(1))


def _installed_from_this_checkout() -> bool:
    """Whether `make install` (pip install -e) ran for this checkout, building the kernel."""
    for dist in importlib.metadata.distributions(name="xray-pipelines"):
        url = json.loads(dist.read_text("direct_url.json") or "{}").get("url")
        if url == REPO.as_uri():
            return True
    return (REPO / ".venv" / ".installed").exists()


def test_kernel_is_built_where_a_compiler_exists() -> None:
    # setup.py marks the extension optional; CI has gcc, so a silent build
    # failure must show up here instead of as a 2x slower pipeline.
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip("no C compiler on this machine")
    if not _installed_from_this_checkout():
        pytest.skip("this checkout was not installed (`make install` builds the kernel)")
    assert pixel_map.kernel_available()


LAYOUTS = [
    # (dtype, bits_stored)
    ("<u2", 12),
    ("<u2", 16),
    (">u2", 12),
    ("<i2", 12),
    (">i2", 10),
    ("<i2", 16),
    ("u1", 8),
    ("u1", 6),
    ("i1", 5),
]


@needs_kernel
@pytest.mark.parametrize(("dtype", "bits_stored"), LAYOUTS)
@pytest.mark.parametrize(("scale", "offset"), [(1 / 4095, 0.0), (-0.0007, 1.3), (0.01, -3.0)])
def test_kernel_equals_numpy_and_the_truth(
    dtype: str, bits_stored: int, scale: float, offset: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(bits_stored)
    raw = rng.integers(0, 256, size=(37, 53, np.dtype(dtype).itemsize), dtype=np.uint8)
    stored = raw.view(dtype)[..., 0]  # every bit pattern, unused high bits set
    calls = []
    real = pixel_map._kernels
    assert real is not None

    class Spy:
        @staticmethod
        def affine_to_float32(*args: object) -> None:
            calls.append(args)
            real.affine_to_float32(*args)

    monkeypatch.setattr(pixel_map, "_kernels", Spy)
    kernel = pixel_map.affine(stored, scale, offset, bits_stored)
    assert len(calls) == 1  # the C kernel did the work
    monkeypatch.setattr(pixel_map, "_kernels", None)
    fallback = pixel_map.affine(stored, scale, offset, bits_stored)
    clean = pixel_map.stored_values(stored, bits_stored)
    low, high = pixel_map.value_range(clean.dtype, bits_stored)
    assert low <= clean.min() and clean.max() <= high  # masked / sign-extended
    assert kernel.dtype == np.float32 and kernel.shape == stored.shape
    np.testing.assert_array_equal(kernel, fallback)
    np.testing.assert_array_equal(kernel, _truth(clean, scale, offset))


def test_stored_values_masks_and_sign_extends() -> None:
    unsigned = np.array([0xF123, 0x0FFF], dtype="<u2")
    assert pixel_map.stored_values(unsigned, 12).tolist() == [0x123, 0xFFF]
    signed = np.array([0x0800, 0x07FF, 0xFFFF], dtype="<u2").view("<i2")
    assert pixel_map.stored_values(signed, 12).tolist() == [-2048, 2047, -1]
    big = np.array([1, 258], dtype=">u2")
    values = pixel_map.stored_values(big, 16)
    assert values.dtype.isnative and values.tolist() == [1, 258]


@needs_kernel
def test_kernel_rejects_mismatched_buffers() -> None:
    kernels = pixel_map._kernels
    assert kernels is not None
    src = np.zeros(10, np.uint16).view(np.uint8)
    with pytest.raises(ValueError, match="one float32"):
        kernels.affine_to_float32(src, np.zeros(9, np.float32), 2, 0, 0, 16, 1, 0, 0, 1)
    with pytest.raises(ValueError, match="layout"):
        kernels.affine_to_float32(src, np.zeros(10, np.float32), 2, 0, 0, 17, 1, 0, 0, 1)


@needs_kernel
@pytest.mark.parametrize("window", [True, False], ids=["window", "percentiles"])
@pytest.mark.parametrize("encoding", ["explicit_le", "big_endian", "implicit_le", "rle"])
def test_decode_is_identical_without_the_kernel(
    encoding: str, window: bool, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from archive_tools.dicom_writer import PixelFormat, RadiographHeader, write_dicom

    rng = np.random.default_rng(7)
    # Without a window: values in a tenth of the range, scaled by the image range.
    stored = rng.integers(0, 4096 if window else 400, size=(64, 48)).astype(np.uint16)
    fmt = PixelFormat(
        bits_stored=12,
        photometric="MONOCHROME1",
        rescale_slope=0.5,
        rescale_intercept=-1024.0,
        window_center=-300.0 if window else None,
        window_width=900.0 if window else None,
    )
    path = tmp_path / "image.dcm"
    write_dicom(path, stored, fmt, encoding, RadiographHeader(patient_id="P1", study_id="S1"))
    with_kernel = dicom.decode(str(path))
    monkeypatch.setattr(pixel_map, "_kernels", None)
    without = dicom.decode(str(path))
    assert (
        with_kernel.intensity_source
        == without.intensity_source
        == ("window" if window else "percentiles")
    )
    np.testing.assert_array_equal(with_kernel.image, without.image)


@needs_kernel
@pytest.mark.parametrize(("dtype", "bits_stored"), [("<u2", 12), (">i2", 10), ("u1", 8)])
@pytest.mark.parametrize(("rows", "cols", "factor"), [(50, 41, 5), (37, 64, 2), (20, 23, 7)])
def test_reduced_kernel_equals_pillow_reduce(
    dtype: str, bits_stored: int, rows: int, cols: int, factor: int
) -> None:
    from PIL import Image

    rng = np.random.default_rng(rows * cols)
    raw = rng.integers(0, 256, size=(rows, cols, np.dtype(dtype).itemsize), dtype=np.uint8)
    stored = raw.view(dtype)[..., 0]
    scale, offset = -0.004, 1.2  # inverted and clipped at both ends
    full = pixel_map.affine(stored, scale, offset, bits_stored)
    pillow = np.asarray(Image.fromarray(full, mode="F").reduce(factor), dtype=np.float32)
    reduced = pixel_map.affine_reduced(stored, scale, offset, bits_stored, factor)
    assert reduced is not None and reduced.shape == (-(-rows // factor), -(-cols // factor))
    # Edge blocks are averaged over the pixels they hold, as Pillow does.
    np.testing.assert_allclose(reduced, pillow, rtol=0, atol=2.4e-7)


def test_reduced_kernel_declines_without_the_kernel(numpy_only: None) -> None:
    stored = np.zeros((8, 8), np.uint16)
    assert pixel_map.affine_reduced(stored, 1.0, 0.0, 12, 2) is None


@needs_kernel
@pytest.mark.parametrize(
    ("encoding", "fmt"),
    [
        ("explicit_le", dict(bits_stored=12)),
        ("big_endian", dict(bits_stored=16, signed=True, rescale_intercept=-1024.0)),
        (
            "rle",
            dict(
                bits_stored=12, photometric="MONOCHROME1", window_center=2000.0, window_width=1500.0
            ),
        ),
        ("explicit_le", dict(bits_stored=8)),
    ],
    ids=["12bit", "big_endian_signed", "rle_mono1_window", "8bit"],
)
def test_model_input_fused_with_the_box_average_matches_the_two_step_path(
    encoding: str, fmt: dict, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from archive_tools.dicom_writer import PixelFormat, RadiographHeader, to_stored, write_dicom
    from archive_tools.phantom import chest_phantom

    pixel_format = PixelFormat(**fmt)
    display = chest_phantom(np.random.default_rng(3), 1100, 900, abnormal=True)
    path = tmp_path / "image.dcm"
    write_dicom(
        path,
        to_stored(display, pixel_format),
        pixel_format,
        encoding,
        RadiographHeader(patient_id="P1", study_id="S1"),
    )
    fused, decoded = dicom.decode_model_input(str(path))
    assert decoded.reduction == box_factor(1100, 900, 224, "pad") > 1
    assert decoded.image.shape == (-(-1100 // decoded.reduction), -(-900 // decoded.reduction))
    monkeypatch.setattr(pixel_map, "_kernels", None)
    two_step, plain = dicom.decode_model_input(str(path))
    assert plain.reduction == 1 and plain.intensity_source == decoded.intensity_source
    np.testing.assert_allclose(fused, two_step, rtol=0, atol=2.4e-7)
