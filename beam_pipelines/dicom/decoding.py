"""From a DICOM source to a normalized image or model input: the decode routes wired together.

Source -> Dataset (:mod:`~beam_pipelines.dicom.dataset`) -> header and
guards (:mod:`~beam_pipelines.dicom.header`, :mod:`~beam_pipelines.dicom.frames`)
-> stored values of frame 0, in full or at a reduced resolution
(:mod:`~beam_pipelines.dicom.reduced`) -> [0, 1] image
(:mod:`~beam_pipelines.dicom.intensity`) -> model input
(:mod:`~beam_pipelines.dicom.resize`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

import beam_pipelines.dicom.frames as frames
import beam_pipelines.dicom.reduced as reduced
from beam_pipelines.dicom.dataset import read_dataset
from beam_pipelines.dicom.errors import DicomRejected
from beam_pipelines.dicom.header import GRAYSCALE, DicomHeader, read_header
from beam_pipelines.dicom.intensity import color_to_gray, normalize_gray
from beam_pipelines.dicom.options import DEFAULT_OPTIONS, DecodeOptions
from beam_pipelines.dicom.reading import Source
from beam_pipelines.dicom.resize import (
    MODEL_INPUT_SIZE,
    ResizePolicy,
    box_factor,
    content_shape,
    to_model_input,
)
from beam_pipelines.privacy import redact


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """A decoded image and the header it came with.

    Attributes:
        image: 2-D float32 in [0, 1], display sense; original resolution
            unless ``reduction`` > 1.
        header: the recorded header fields.
        inverted: True when MONOCHROME1 was inverted.
        intensity_source: what the intensities were mapped by (preprocessing
            counts it as ``intensity_<source>``): ``"window"`` or ``"voi_lut"`` (the
            header's VOI); without one, ``"image_range"`` (scaled by the
            header's true Smallest / Largest Image Pixel Value) or
            ``"percentiles"`` (by the 0.5th / 99.5th percentiles of the
            pixels); ``"window_ignored"`` (the window missed the image, which
            was then scaled like one without a window); ``"bit_range"`` (by
            the whole stored bit range: ``range_source="bit_range"``, colour
            input, or an image range the modality LUT flattens to nothing);
            ``"min_max"`` (float pixel data only).
        color_converted: True when a colour encoding was reduced to gray.
        route: how the pixels were decoded: ``"full"``, ``"j2k_reduced"`` (a
            JPEG 2000 resolution level) or ``"jpeg_scaled"`` (JPEG DCT scaling).
        reduction: each side of ``image`` is the original's divided by this
            (rounded up); 1 on the full path.
    """

    image: np.ndarray
    header: DicomHeader
    inverted: bool
    intensity_source: str
    color_converted: bool
    route: str = "full"
    reduction: int = 1


#: Every value of :attr:`DecodedImage.route`.
DECODE_ROUTES: tuple[str, ...] = ("full", "j2k_reduced", "jpeg_scaled")


def decode(source: Source | Dataset, options: DecodeOptions = DEFAULT_OPTIONS) -> DecodedImage:
    """Decodes and normalizes a DICOM image; the policy is :mod:`beam_pipelines.dicom`'s docstring.

    Args:
        source: a path or URI, the file's bytes, a binary file object, or a
            dataset from :func:`read_dataset`.
        options: the decode policy.

    Returns:
        The [0, 1] float32 image at the original resolution, with its header.

    Raises:
        DicomRejected: for every per-file problem.
    """
    return _decode(source, options)


def decode_model_input(
    source: Source | Dataset,
    options: DecodeOptions = DEFAULT_OPTIONS,
    size: int = MODEL_INPUT_SIZE,
    policy: ResizePolicy = "pad",
) -> tuple[np.ndarray, DecodedImage]:
    """Decodes a DICOM straight to the model input: what preprocessing and scoring call.

    With ``options.reduced_resolution`` (the default), JPEG 2000 and 8-bit
    JPEG images are decoded at the coarsest resolution the codec offers that
    is still at least the size :func:`to_model_input` shrinks them to (never
    below), then go through exactly the same intensity pipeline and resize
    as a full decode. Everything else, and any stream the reduced decoder
    refuses, takes the full path; ``DecodedImage.route`` says which was used.

    Returns:
        The ``(size, size, 1)`` float32 model input and the decoded image.

    Raises:
        DicomRejected: for every per-file problem.
    """
    decoded = _decode(source, options, model_input=(size, policy))
    full_shape = (decoded.header.rows, decoded.header.columns)
    image = to_model_input(decoded.image, size, policy, full_shape, decoded.reduction)
    return image, decoded


def _decode(
    source: Source | Dataset,
    options: DecodeOptions,
    model_input: tuple[int, ResizePolicy] | None = None,
) -> DecodedImage:
    ds = source if isinstance(source, Dataset) else read_dataset(source, options)
    try:
        header = read_header(ds, options.reference_keywords)
    except Exception as exc:
        raise DicomRejected("not_dicom", f"header fields unreadable: {redact(exc)}") from exc
    pixel_keyword = frames.pixel_keyword(ds)
    frames.check_geometry(ds, header, pixel_keyword, options)
    if pixel_keyword == "PixelData" and UID(header.transfer_syntax_uid).is_encapsulated:
        frames.check_frame_header(ds, header)
    reduced_frame = None
    if model_input is not None and options.reduced_resolution:
        minimum = content_shape(header.rows, header.columns, *model_input)
        reduced_frame = reduced.decode_reduced(ds, header, pixel_keyword, minimum)
    native = None
    if reduced_frame is None:
        native = frames.native_view(ds, header)
        stored = native if native is not None else frames.decode_first_frame(ds, header)
        route, reduction = "full", 1
    else:
        stored, route, reduction = reduced_frame
    photometric = header.photometric_interpretation
    if header.samples_per_pixel == 1 and photometric in GRAYSCALE:
        inverted = photometric == "MONOCHROME1"
        # The in-place view still holds the file's unused high bits.
        raw_bits = header.bits_stored if native is not None else None
        # A full decode for the model input is box-reduced while it is mapped.
        box = 1
        if model_input is not None and reduced_frame is None:
            box = box_factor(header.rows, header.columns, *model_input)
        image, source, boxed = normalize_gray(
            stored, ds, header, options, pixel_keyword, inverted, raw_bits, box
        )
        return DecodedImage(image, header, inverted, source, False, route, reduction * boxed)
    image = color_to_gray(stored, ds, header, options)
    return DecodedImage(
        image, header, inverted=False, intensity_source="bit_range", color_converted=True
    )


def read_image(source: Source | Dataset, options: DecodeOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """Returns the image as 2-D float32 in [0, 1], original resolution, display sense.

    Raises:
        DicomRejected: for every per-file problem, with a stable reason code.
    """
    return decode(source, options).image
