"""Stored DICOM pixel values to float32 ``clip(v * scale + offset, 0, 1)``, in one pass.

Most headers (bit range, rescale, LINEAR windows, MONOCHROME1 inversion)
make the whole grayscale pipeline one clipped straight line over the stored
values (:mod:`beam_pipelines.dicom` finds it). Evaluating it with numpy takes
up to five passes over a radiograph (byte swap or bit mask, float32
conversion, multiply, add, clip), which cost 1.4-2.1x pydicom's whole
``pixel_array``. The C kernel ``beam_pipelines.dicom._pixel_kernels`` (built by
``setup.py``; optional) does all of it in one pass with the GIL released.
Without it the numpy fallback here gives bit-identical results, slower.

:func:`affine_reduced` also box-averages while mapping, which is the first
step of the resize to the model input: a radiograph then goes from stored
values to a ~500 x 400 float image without the 20 MB full-size one (what
:func:`beam_pipelines.dicom.decode_model_input` uses; without the kernel it
maps in full and Pillow reduces, equal within 2 float32 ulps).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import numpy as np

logger = logging.getLogger(__name__)


def _load_kernels() -> ModuleType | None:
    try:
        return importlib.import_module("beam_pipelines.dicom._pixel_kernels")
    except ImportError:  # built without a C compiler: numpy does the same maths
        return None


_kernels = _load_kernels()
_warned = False


def kernel_available() -> bool:
    """True when the compiled one-pass kernel is importable."""
    return _kernels is not None


def stored_values(raw: np.ndarray, bits_stored: int | None = None) -> np.ndarray:
    """Native-order values of the low ``bits_stored`` bits, as pydicom returns them.

    Unused high bits are masked (unsigned) or sign-extended from bit
    ``bits_stored`` (signed); big-endian input is swapped once. Returns
    ``raw`` itself when there is nothing to do.
    """
    frame = raw if raw.dtype.isnative else raw.astype(raw.dtype.newbyteorder("="))
    bits = frame.dtype.itemsize * 8
    if bits_stored is None or not 0 < bits_stored < bits:
        return frame
    unused = bits - bits_stored
    if frame.dtype.kind == "i":
        return (frame << unused) >> unused  # sign-extend from bit `bits_stored`
    if int(frame.max()) >> bits_stored:
        return frame & frame.dtype.type(2**bits_stored - 1)
    return frame


def bit_range(bits: int, signed: bool) -> tuple[int, int]:
    """The smallest and largest value ``bits`` bits hold (two's complement if signed)."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def value_range(dtype: np.dtype, bits_stored: int | None) -> tuple[int, int]:
    """The smallest and largest value the low ``bits_stored`` bits of ``dtype`` hold."""
    bits = dtype.itemsize * 8
    if bits_stored is not None and 0 < bits_stored < bits:
        bits = bits_stored
    return bit_range(bits, dtype.kind == "i")


def affine(
    stored: np.ndarray,
    scale: float,
    offset: float,
    bits_stored: int | None = None,
) -> np.ndarray:
    """``clip(float32(v) * float32(scale) + float32(offset), 0, 1)`` for each stored value.

    Args:
        stored: integer pixels in any byte order (e.g. a view of the file).
        scale, offset: the line, applied in float32 (as numpy would).
        bits_stored: only the low bits hold the value (unused high bits are
            masked or sign-extended first); None: every bit does.

    Returns:
        A new float32 array of the same shape.
    """
    scale32, offset32 = np.float32(scale), np.float32(offset)
    if _kernel_takes(stored):
        out = np.empty(stored.shape, dtype=np.float32)
        assert _kernels is not None
        _kernels.affine_to_float32(*_kernel_args(stored, out, scale, offset, bits_stored))
        return out
    _warn_fallback()
    values = stored_values(stored, bits_stored)
    image = np.multiply(values, scale32, dtype=np.float32)
    image += offset32
    # Clipping costs two passes over the float image; the values' range
    # (from the bit depth when the data was masked to it, else a min/max
    # over the half as large stored values) tells whether any pixel needs it.
    if bits_stored is not None and values.dtype.itemsize <= 2:
        low, high = value_range(values.dtype, bits_stored)
    else:
        low, high = values.min(), values.max()
    # The ends computed with the image's own float32 operations (monotonic
    # under rounding), so they bound every pixel exactly.
    ends = [np.float32(v) * scale32 + offset32 for v in (low, high)]
    if min(ends) < 0.0 or max(ends) > 1.0:
        np.maximum(image, 0.0, out=image)  # faster than np.clip on numpy 1.26
        np.minimum(image, 1.0, out=image)
    return image


def affine_reduced(
    stored: np.ndarray,
    scale: float,
    offset: float,
    bits_stored: int | None,
    factor: int,
) -> np.ndarray | None:
    """:func:`affine`, box-averaged over ``factor`` x ``factor`` blocks, in one pass.

    What ``Image.reduce(factor)`` makes of the float image (edge blocks are
    averaged over the pixels they hold; equal to Pillow's within 2 float32
    ulps), without ever writing the full-size float image: for a 2500 x 2048
    radiograph this replaces three passes over 20 MB. Returns None when the
    kernel is not built or cannot take the array.
    """
    if not _kernel_takes(stored) or stored.ndim != 2 or factor < 1:
        return None
    if not hasattr(_kernels, "affine_reduce_to_float32"):
        return None  # a kernel built from an older source: `make install` rebuilds it
    rows, cols = stored.shape
    out = np.empty((-(-rows // factor), -(-cols // factor)), dtype=np.float32)
    assert _kernels is not None
    _kernels.affine_reduce_to_float32(
        *_kernel_args(stored, out, scale, offset, bits_stored), rows, cols, factor
    )
    return out


def _kernel_takes(stored: np.ndarray) -> bool:
    return (
        _kernels is not None
        and stored.dtype.kind in "iu"
        and stored.dtype.itemsize in (1, 2)
        and stored.flags.c_contiguous
    )


def _kernel_args(
    stored: np.ndarray, out: np.ndarray, scale: float, offset: float, bits_stored: int | None
) -> tuple[object, ...]:
    """The layout and line arguments both kernels share."""
    bits = stored.dtype.itemsize * 8
    return (
        stored.reshape(-1).view(np.uint8),
        out.reshape(-1),
        stored.dtype.itemsize,
        int(stored.dtype.kind == "i"),
        int(not stored.dtype.isnative and stored.dtype.itemsize > 1),
        bits_stored if bits_stored is not None and 0 < bits_stored <= bits else bits,
        np.float32(scale),
        np.float32(offset),
        0.0,
        1.0,
    )


def _warn_fallback() -> None:
    global _warned
    if _kernels is None and not _warned:
        _warned = True
        logger.warning(
            "beam_pipelines.dicom._pixel_kernels is not built (no C compiler at install?): "
            "pixel normalization uses numpy, about 2x slower for uncompressed files"
        )
