"""Frame 0's stored values at full resolution, after the guards that keep decoding bounded.

The geometry guards run before any pixel buffer is allocated from header
values; uncompressed 8/16-bit grayscale is viewed in the file's bytes;
anything else goes through pydicom's decoders, fastest plugin first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pydicom
import pydicom.encaps
from pydicom.dataset import Dataset
from pydicom.uid import UID

import beam_pipelines.dicom.reduced as reduced
from beam_pipelines.dicom.errors import DicomRejected
from beam_pipelines.dicom.header import COLOR, GRAYSCALE, DicomHeader
from beam_pipelines.dicom.options import DecodeOptions
from beam_pipelines.privacy import quiet_plugin_errors, redact


def pixel_keyword(ds: Dataset) -> str:
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            return keyword
    raise DicomRejected("no_pixel_data", "the data set has no pixel data element")


def check_geometry(ds: Dataset, header: DicomHeader, keyword: str, options: DecodeOptions) -> None:
    """Guards run before any pixel buffer is allocated from header values."""
    rows, cols, samples = header.rows, header.columns, header.samples_per_pixel
    if rows <= 0 or cols <= 0 or header.bits_allocated <= 0:
        raise DicomRejected("no_pixel_data", "Rows, Columns or BitsAllocated missing or zero")
    if samples not in (1, 3):
        raise DicomRejected("unsupported_pixel_format", f"SamplesPerPixel {samples}")
    if rows * cols * samples > options.max_pixels:
        raise DicomRejected(
            "too_large", f"{rows}x{cols}x{samples} exceeds the {options.max_pixels}-pixel limit"
        )
    photometric = header.photometric_interpretation
    if photometric not in GRAYSCALE + COLOR:
        raise DicomRejected("unsupported_photometric", f"PhotometricInterpretation {photometric!r}")
    if photometric in COLOR and options.color == "reject":
        raise DicomRejected("unsupported_photometric", f"colour image ({photometric})")
    if header.number_of_frames > 1 and options.multiframe == "reject":
        raise DicomRejected("multi_frame", f"{header.number_of_frames} frames")

    syntax = UID(header.transfer_syntax_uid)
    if not syntax.is_transfer_syntax:
        raise DicomRejected("unsupported_transfer_syntax", f"unknown transfer syntax {syntax}")
    if keyword != "PixelData" or not syntax.is_encapsulated:
        element = ds.get_item(keyword, keep_deferred=True)
        value = element.value
        length = getattr(element, "length", 0) if value is None else len(value)
        if not length or length == 0xFFFFFFFF:
            raise DicomRejected("no_pixel_data", "the pixel data element is empty")
        bits = header.bits_allocated
        frames = header.number_of_frames
        expected = (rows * cols * samples * frames * bits + 7) // 8
        # Frame 0 is all we decode; a multi-frame file short of its later
        # frames is still a mismatch, since the header lies about it.
        if length < expected:
            raise DicomRejected(
                "pixel_length_mismatch",
                f"{length} pixel bytes, header declares {expected}",
            )
    else:
        try:
            value = ds.PixelData
        except Exception as exc:  # e.g. an unknown VR, converted on first access
            raise DicomRejected("not_dicom", f"pixel data unreadable: {redact(exc)}") from exc
        if value is None or len(value) == 0:
            raise DicomRejected("no_pixel_data", "the encapsulated pixel data is empty")


def native_view(ds: Dataset, header: DicomHeader) -> np.ndarray | None:
    """Frame 0 of uncompressed 8/16-bit grayscale, viewed in the file's bytes (no copy).

    Returns None when the file is not such a case (pydicom then decodes).
    The view keeps the file's byte order and any unused high bits: the
    intensity mapping cleans them on the fly (:mod:`beam_pipelines.dicom.pixel_map`).
    """
    data = ds.__dict__.get("_xray_bytes")
    element: Any = ds.get_item("PixelData", keep_deferred=True) if "PixelData" in ds else None
    bits, stored = header.bits_allocated, header.bits_stored
    if (
        data is None
        or element is None
        or getattr(element, "value", b"") is not None  # not deferred: already read
        or header.samples_per_pixel != 1
        or bits not in (8, 16)
        or not 0 < stored <= bits
    ):
        return None
    signed = header.pixel_representation == 1
    order = ds.__dict__.get("_xray_byte_order", "<")
    dtype = np.dtype(order + ("i" if signed else "u") + str(bits // 8))
    count = header.rows * header.columns
    if element.value_tell + count * dtype.itemsize > len(data):
        return None
    frame = np.frombuffer(data, dtype=dtype, count=count, offset=element.value_tell)
    return frame.reshape(header.rows, header.columns)


def decode_first_frame(ds: Dataset, header: DicomHeader) -> np.ndarray:
    syntax = UID(header.transfer_syntax_uid)
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except (NotImplementedError, ValueError) as exc:
        raise DicomRejected(
            "unsupported_transfer_syntax", f"no decoder for transfer syntax {syntax}"
        ) from exc
    if not decoder.is_available:
        raise DicomRejected(
            "unsupported_transfer_syntax", f"no installed plugin decodes {syntax.name}"
        )
    array = None
    failures = []
    for plugin in plugin_order(decoder.available_plugins, syntax):
        try:
            # as_rgb converts YBR to RGB; index=0 decodes only the first frame.
            with quiet_plugin_errors():
                # pydicom's stub types **kwargs as DecodeOptions; both are documented.
                array, _ = decoder.as_array(
                    ds,
                    index=0,
                    as_rgb=True,  # type: ignore[arg-type]
                    decoding_plugin=plugin,
                )
            break
        except (MemoryError, KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - a Rust codec panics with a BaseException
            failures.append(f"{plugin}: {redact(exc, 120)}")
    if array is None:
        raise DicomRejected("decode_failed", f"{syntax.name}: {'; '.join(failures)}"[:400])
    if array.ndim == 3 and header.samples_per_pixel == 1:
        array = array[0]
    if not array.dtype.isnative:
        # Big endian data: one byte swap here, not a slow strided one in every
        # arithmetic pass (and the lookup tables are built for native order).
        array = array.astype(array.dtype.newbyteorder("="))
    expected = (header.rows, header.columns)
    if array.shape[:2] != expected:
        raise DicomRejected(
            "decode_failed", f"decoded shape {array.shape} does not match {expected}"
        )
    return array


# The fastest plugin per syntax, measured on 2500x2048 12-bit images
# (benchmarks/decode_benchmark.py): CharLS for JPEG-LS (pylibjpeg's libjpeg
# is 2.9x slower), OpenJPEG through pylibjpeg for JPEG 2000 (Pillow's path
# is 1.8x slower), libjpeg-turbo through Pillow for 8-bit JPEG (2.8x faster
# than libjpeg), pylibjpeg-rle's Rust for RLE (13x faster than pydicom's own).
_FASTEST_PLUGINS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"), ("pyjpegls",)),
    **dict.fromkeys(reduced.J2K_SYNTAXES, ("pylibjpeg",)),
    **dict.fromkeys(reduced.JPEG_SYNTAXES, ("pillow",)),
    "1.2.840.10008.1.2.5": ("pylibjpeg",),
}


def plugin_order(available: tuple[str, ...], syntax: str = "") -> list[str]:
    """Plugin names to try: the fastest for the syntax, then pydicom's order, GDCM last.

    GDCM comes only when nothing else can decode the syntax: on malformed
    input it aborts the whole process (uncaught C++ exceptions, segfaults),
    which no except clause can turn into a reject. ``""`` lets pydicom
    decode native data itself.
    """
    ordered = [p for p in _FASTEST_PLUGINS.get(syntax, ()) if p in available]
    ordered += [p for p in available if p not in ordered and p != "gdcm"]
    return ordered or list(available) or [""]


# Real radiographs use one tile or a few dozen; 4096 is 64x64-pixel tiles on 4096^2.
_MAX_J2K_TILES = 4096


def check_frame_header(ds: Dataset, header: DicomHeader) -> None:
    """Rejects a compressed frame whose own header disagrees with Rows x Columns.

    Codecs allocate from the frame's header, not the DICOM one: a 2 KB file
    claiming a 65000 x 65000 frame would take minutes and gigabytes before
    the shape check after decoding could reject it.
    """
    try:
        items = pydicom.encaps.generate_fragments(ds.PixelData)
        next(items, None)  # the Basic Offset Table item always comes first
        first_fragment = next(items, b"")
    except Exception:  # a broken fragment table: the decoder says what is wrong
        return
    codestream = reduced.read_codestream(first_fragment)
    if codestream is not None and codestream.tiles > _MAX_J2K_TILES:
        # Tiny tiles cost OpenJPEG ~500 MB and a second per file, whatever the size.
        raise DicomRejected(
            "decode_failed", f"the JPEG 2000 frame declares {codestream.tiles} tiles"
        )
    if codestream is not None:  # parsed once: JPEG 2000 needs no second look
        shape: tuple[int, int] | None = (codestream.rows, codestream.columns)
    else:
        shape = reduced.frame_shape(first_fragment)
    if shape is not None and shape != (header.rows, header.columns):
        raise DicomRejected(
            "decode_failed",
            f"the compressed frame's header says {shape[0]}x{shape[1]}, "
            f"the DICOM header {header.rows}x{header.columns}",
        )
