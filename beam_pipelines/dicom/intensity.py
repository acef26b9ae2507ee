"""Stored values to a [0, 1] display image: the DICOM grayscale pipeline (PS3.4 N.2).

Modality LUT, then VOI (window or VOI LUT) or the image's own range
(:mod:`beam_pipelines.dicom.image_range`), then MONOCHROME1 inversion: built
as one function over the stored values, evaluated once over every value the
header allows (:class:`_Mapping`) and applied in one pass. Float pixel data
and colour input have their own, simpler rules.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import pydicom
from pydicom.dataset import Dataset

import beam_pipelines.dicom.pixel_map as pixel_map
from beam_pipelines.dicom.errors import DicomRejected
from beam_pipelines.dicom.header import (
    DicomHeader,
    float_value,
    float_values,
    sequence_items,
    str_value,
)
from beam_pipelines.dicom.image_range import image_range, range_sample, stored_range
from beam_pipelines.dicom.options import DecodeOptions
from beam_pipelines.privacy import redact

logger = logging.getLogger(__name__)

# Channels of a "grayscale saved as colour" image differ by at most this
# fraction of full scale on average (lossy YBR round trips add a little).
_GRAY_TOLERANCE = 0.01
# Modes that come from the header's VOI; a window may miss the image.
_VOI_MODES = ("window", "voi_lut")


def normalize_gray(
    stored: np.ndarray,
    ds: Dataset,
    header: DicomHeader,
    options: DecodeOptions,
    keyword: str,
    invert: bool,
    raw_bits: int | None = None,
    reduce_by: int = 1,
) -> tuple[np.ndarray, str, int]:
    """Modality LUT, VOI, range scaling and inversion; returns float32 [0, 1].

    ``raw_bits``: ``stored`` is a view of the file
    (:func:`~beam_pipelines.dicom.frames.native_view`): any byte order, and
    only its low ``raw_bits`` bits hold the value.
    ``reduce_by``: the caller only needs the image box-averaged by this
    factor (:func:`~beam_pipelines.dicom.decode_model_input`); it is made
    without the full-size image where the one-pass kernel can. Returns
    (image, mode, reduction).
    """
    if keyword != "PixelData" or stored.dtype.kind == "f":
        image, mode = _normalize_float(stored, ds, options)
        return (1.0 - image if invert else image), mode, 1
    values = None
    if options.range_source == "image":
        # Sampled only for an image without a (usable) window: windowed ones
        # pay nothing for it.
        values = lambda: range_sample(stored, raw_bits)  # noqa: E731
    transform, mode = _intensity_transform(ds, header, options.voi_index, invert, values)
    mapping = _Mapping.build(stored.dtype, transform, raw_bits)
    if mode in _VOI_MODES and _misses_image(mapping.apply(_sample(stored))):
        # A window that leaves (nearly) every pixel saturated describes some
        # other image (edited pixels, copied headers): scale as without one.
        transform, _ = _intensity_transform(ds, header, None, invert, values)
        mapping, mode = _Mapping.build(stored.dtype, transform, raw_bits), "window_ignored"
    if reduce_by > 1:
        reduced = mapping.apply_reduced(stored, reduce_by)
        if reduced is not None:
            return reduced, mode, reduce_by
    return mapping.apply(stored), mode, 1


@dataclasses.dataclass(frozen=True)
class _Mapping:
    """Stored value -> [0, 1], evaluated once over every value that can occur.

    A clipped straight line (bit range, rescale, LINEAR windows, inversion)
    is applied in one pass by :mod:`beam_pipelines.dicom.pixel_map`; anything else
    through ``table``, one gather; 32-bit data element-wise.
    """

    transform: Callable[[np.ndarray], np.ndarray]
    raw_bits: int | None
    line: tuple[float, float] | None
    # float32 over every value of the 8/16-bit dtype, indexed by a uint view of
    # the values (two's complement covers signed data); when there is no line.
    table: np.ndarray | None = None

    @staticmethod
    def build(
        dtype: np.dtype, transform: Callable[[np.ndarray], np.ndarray], raw_bits: int | None
    ) -> _Mapping:
        if dtype.itemsize > 2:
            return _Mapping(transform, raw_bits, None)
        native = dtype.newbyteorder("=")
        low, high = pixel_map.value_range(native, raw_bits)
        domain = np.arange(low, high + 1, dtype=np.float64)
        values = _evaluate(transform, domain)
        line = _as_line(domain, values, np.clip(values, 0.0, 1.0))
        if line is not None:
            return _Mapping(transform, raw_bits, line)
        unsigned_type = np.uint8 if dtype.itemsize == 1 else np.uint16
        every_value = np.arange(2 ** (8 * dtype.itemsize), dtype=unsigned_type).view(native)
        table = np.clip(_evaluate(transform, every_value.astype(np.float64)), 0.0, 1.0)
        return _Mapping(transform, raw_bits, None, table.astype(np.float32))

    def apply(self, stored: np.ndarray) -> np.ndarray:
        if self.line is not None:
            return pixel_map.affine(stored, *self.line, bits_stored=self.raw_bits)
        if self.table is not None:
            unsigned_type = np.uint8 if stored.dtype.itemsize == 1 else np.uint16
            return self.table[pixel_map.stored_values(stored, self.raw_bits).view(unsigned_type)]
        # 32-bit integer data: too wide for a table; same maths, element-wise.
        values = self.transform(stored.astype(np.float64))
        return np.clip(values, 0.0, 1.0).astype(np.float32)

    def apply_reduced(self, stored: np.ndarray, factor: int) -> np.ndarray | None:
        """The image box-averaged by ``factor`` in one pass, or None (line mappings only)."""
        if self.line is None:
            return None
        return pixel_map.affine_reduced(stored, *self.line, self.raw_bits, factor)


def _sample(stored: np.ndarray) -> np.ndarray:
    """About 256 x 256 pixels spread over the image (for :func:`_misses_image`)."""
    rows, cols = stored.shape
    return np.ascontiguousarray(stored[:: max(1, rows // 256), :: max(1, cols // 256)])


def _evaluate(transform: Callable[[np.ndarray], np.ndarray], domain: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        values = transform(domain)
    if not np.isfinite(values).all():
        # E.g. a Rescale Slope of 1e308: the header's maths overflows.
        raise DicomRejected(
            "unsupported_pixel_format", "the header's intensity transform is not finite"
        )
    return values


def _as_line(
    domain: np.ndarray, values: np.ndarray, table: np.ndarray
) -> tuple[float, float] | None:
    """(scale, offset) when the table is exactly clip(scale * x + offset), else None."""
    inside = np.flatnonzero((table > 0.0) & (table < 1.0))
    if inside.size < 2:
        return None
    first, last = inside[0], inside[-1]
    if domain[last] == domain[first]:
        return None
    scale = (values[last] - values[first]) / (domain[last] - domain[first])
    offset = values[first] - scale * domain[first]
    if np.max(np.abs(np.clip(domain * scale + offset, 0.0, 1.0) - table)) > 1e-9:
        return None
    return float(scale), float(offset)


def _misses_image(sample: np.ndarray) -> bool:
    """True when under 1% of the (sampled, mapped) pixels fall inside the window."""
    inside = np.count_nonzero((sample > 0.0) & (sample < 1.0))
    return inside < 0.01 * sample.size


def _intensity_transform(
    ds: Dataset,
    header: DicomHeader,
    voi_index: int | None,
    invert: bool,
    values: Callable[[], np.ndarray] | None = None,
) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """Builds stored value -> [0,1]: modality LUT, VOI or range scaling, inversion.

    ``values``: returns a sample of the image's stored values
    (:func:`range_sample`); given, an image without VOI is scaled by its
    own range (:func:`image_range`), else by the bit range.
    """
    modality, lo, hi = _modality_transform(ds, header)
    voi = _voi_transform(ds, voi_index) if voi_index is not None else None
    mode = "bit_range"
    if voi is not None:
        voi_fn, mode = voi
        forward: Callable[[np.ndarray], np.ndarray] = lambda x: voi_fn(modality(x))  # noqa: E731
    else:
        if values is not None:
            stored_lo, stored_hi, source = image_range(ds, header, values())
            with np.errstate(all="ignore"):
                ends = modality(np.array([stored_lo, stored_hi], dtype=np.float64))
            # A modality LUT flat over the image's range leaves nothing to
            # scale by: keep the bit range (whose non-finite maths, if any,
            # _evaluate rejects as before).
            if np.isfinite(ends).all() and ends.max() > ends.min():
                lo, hi, mode = float(ends.min()), float(ends.max()), source
        # Clipped to [0, 1] by _Mapping: an image range cuts the tails.
        forward = np.zeros_like if hi - lo <= 0 else lambda x: (modality(x) - lo) / (hi - lo)
    if invert:
        return (lambda x: 1.0 - forward(x)), mode
    return forward, mode


def _modality_transform(
    ds: Dataset, header: DicomHeader
) -> tuple[Callable[[np.ndarray], np.ndarray], float, float]:
    """Returns the modality LUT and the range of its output over the stored range."""
    smin, smax = stored_range(header)

    sequence = sequence_items(ds, "ModalityLUTSequence")
    if sequence:
        lut = _lut_from_item(sequence[0])
        if lut is not None:
            # Inputs outside the table clamp to its ends, so the table's own
            # extremes are the exact range of the output.
            first, table = lut
            return (lambda x: _apply_lut(x, first, table)), float(table.min()), float(table.max())

    slope = float_value(ds, "RescaleSlope", 1.0) or 1.0
    intercept = float_value(ds, "RescaleIntercept", 0.0)
    lo, hi = sorted((smin * slope + intercept, smax * slope + intercept))
    return (lambda x: x * slope + intercept), lo, hi


def _voi_transform(
    ds: Dataset, index: int
) -> tuple[Callable[[np.ndarray], np.ndarray], str] | None:
    sequence = sequence_items(ds, "VOILUTSequence")
    if sequence and len(sequence) > index:
        lut = _lut_from_item(sequence[index])
        if lut is not None:
            # The descriptor's bit depth is often wrong in the wild; the
            # table's extremes are the range it really produces.
            first, table = lut
            lo, span = float(table.min()), float(table.max() - table.min())
            if span > 0:
                return (lambda x: (_apply_lut(x, first, table) - lo) / span), "voi_lut"

    centers = float_values(ds, "WindowCenter")
    widths = float_values(ds, "WindowWidth")
    if len(centers) > index and len(widths) > index:
        center, width = centers[index], widths[index]
        function = str_value(ds, "VOILUTFunction").upper() or "LINEAR"
        window = _window(center, width, function)
        if window is not None:
            return window, "window"
    return None


def _window(
    center: float, width: float, function: str
) -> Callable[[np.ndarray], np.ndarray] | None:
    """The DICOM VOI LUT functions (PS3.3 C.11.2.1.2), output scaled to [0,1]."""
    if function == "SIGMOID":
        if width <= 0:
            return None
        return lambda x: 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            return None
        return lambda x: np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:  # LINEAR requires width >= 1
        return None
    if width == 1:
        return lambda x: (x >= center - 0.5).astype(np.float64)
    return lambda x: np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _lut_from_item(item: Dataset) -> tuple[int, np.ndarray] | None:
    """Reads (first mapped value, table) from a LUT item, or None if unusable."""
    try:
        descriptor = [int(v) for v in item.LUTDescriptor]
        entries = descriptor[0] or 65536
        first = descriptor[1]
        out_bits = descriptor[2]
        raw = item.LUTData
        if isinstance(raw, bytes | bytearray):
            dtype = "<u1" if out_bits <= 8 and len(raw) == entries else "<u2"
            table = np.frombuffer(raw, dtype=dtype).astype(np.float64)
        else:
            table = np.asarray(raw if hasattr(raw, "__len__") else [raw], dtype=np.float64)
        if table.size == 0 or not np.isfinite(table).all():
            return None  # an empty LUT Data reads as [None] -> [nan]
        # First-mapped is signed (US or SS VR) when the stored data is.
        if first > 32767 and item["LUTDescriptor"].VR == "SS":
            first -= 65536
        return first, table[:entries]
    except Exception:  # a broken optional LUT falls back to the next rule
        logger.debug("ignoring an unreadable LUT item", exc_info=True)
        return None


def _apply_lut(x: np.ndarray, first: int, table: np.ndarray) -> np.ndarray:
    index = np.clip(np.rint(x - first), 0, table.size - 1).astype(np.int64)
    return table[index]


def _normalize_float(
    stored: np.ndarray, ds: Dataset, options: DecodeOptions
) -> tuple[np.ndarray, str]:
    values = stored.astype(np.float64)
    slope = float_value(ds, "RescaleSlope", 1.0) or 1.0
    values = values * slope + float_value(ds, "RescaleIntercept", 0.0)
    voi = _voi_transform(ds, options.voi_index) if options.voi_index is not None else None
    if voi is not None:
        return np.clip(voi[0](values), 0, 1).astype(np.float32), voi[1]
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(values.shape, np.float32), "min_max"
    scaled = np.nan_to_num((values - lo) / (hi - lo), nan=0.0)
    return np.clip(scaled, 0, 1).astype(np.float32), "min_max"


def color_to_gray(
    stored: np.ndarray, ds: Dataset, header: DicomHeader, options: DecodeOptions
) -> np.ndarray:
    photometric = header.photometric_interpretation
    if photometric == "PALETTE COLOR":
        try:
            rgb = pydicom.pixels.apply_color_lut(stored, ds)
        except Exception as exc:
            raise DicomRejected("decode_failed", f"palette lookup failed: {redact(exc)}") from exc
        full_scale = 255.0 if rgb.dtype == np.uint8 else 65535.0
    else:
        if stored.ndim != 3 or stored.shape[-1] != 3:
            raise DicomRejected(
                "unsupported_pixel_format", f"{photometric} with array shape {stored.shape}"
            )
        rgb = stored
        full_scale = float(2 ** min(header.bits_stored or 8, stored.dtype.itemsize * 8) - 1)
    rgb = rgb.astype(np.float32) / np.float32(full_scale)
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if options.color == "gray_only":
        spread = float(np.mean(np.abs(rgb - gray[..., None])))
        if spread > _GRAY_TOLERANCE:
            raise DicomRejected(
                "unsupported_photometric",
                f"colour image ({photometric}, mean channel spread {spread:.3f})",
            )
    return np.clip(gray, 0.0, 1.0)
