"""How to decode: :class:`DecodeOptions`, whose defaults are the documented policy."""

from __future__ import annotations

import dataclasses
from typing import Literal

from beam_pipelines.storage.dicomweb import DicomwebSettings

#: What an image without a usable VOI is scaled by (:attr:`DecodeOptions.range_source`).
RangeSource = Literal["image", "bit_range"]


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How to decode; the defaults are the documented policy.

    Attributes:
        voi_index: which window / VOI LUT to apply (0 = the first); None
            ignores VOI and scales by the range ``range_source`` names.
        range_source: what an image without a usable VOI is scaled by:
            ``"image"`` (the default), its actual stored range: Smallest /
            Largest Image Pixel Value when true, else the 0.5th / 99.5th
            percentiles of its pixels (see the module docstring, step 4);
            ``"bit_range"``, the whole range Bits Stored allows (the rule
            before; a 16-bit image using a few percent of it comes out flat
            mid-grey).
        multiframe: ``"first"`` decodes frame 0 of a multi-frame image;
            ``"reject"`` rejects it with ``multi_frame``.
        color: ``"gray_only"`` accepts colour-encoded images whose channels
            agree and rejects real colour; ``"luminance"`` converts any colour
            image; ``"reject"`` rejects every colour encoding.
        max_pixels: largest Rows x Columns x Samples accepted (``too_large``).
        max_file_bytes: largest file read into memory (``too_large``); for
            the Deflated Explicit VR Little Endian syntax, also the largest
            data set it inflates to.
        read_timeout_s: longest a remote (object store) file may take to
            read, checked between its chunks (``unreadable``).
        reduced_resolution: let :func:`~beam_pipelines.dicom.decode_model_input` decode JPEG 2000
            and 8-bit JPEG at a reduced resolution that is still at least the
            model input's size (see :mod:`beam_pipelines.dicom.reduced`);
            False always decodes every pixel.
        dicomweb: the DICOMweb service a ``dicomweb+http(s)://`` path is
            fetched from, with its credentials, timeout and retries; None
            fetches such a path anonymously with the defaults.
        reference_keywords: header elements kept as text in the header's
            ``reference`` (what a Structured Report of the image's score
            needs: patient, study, the image's UIDs); () keeps none.
    """

    voi_index: int | None = 0
    multiframe: Literal["first", "reject"] = "first"
    color: Literal["gray_only", "luminance", "reject"] = "gray_only"
    max_pixels: int = 64_000_000
    max_file_bytes: int = 2 * 1024**3
    reduced_resolution: bool = True
    read_timeout_s: float = 300.0
    range_source: RangeSource = "image"
    dicomweb: DicomwebSettings | None = None
    reference_keywords: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.range_source not in ("image", "bit_range"):
            raise ValueError(
                f"range_source must be 'image' or 'bit_range', not {self.range_source!r}"
            )
        if self.multiframe not in ("first", "reject"):
            raise ValueError(f"multiframe must be 'first' or 'reject', not {self.multiframe!r}")
        if self.color not in ("gray_only", "luminance", "reject"):
            raise ValueError(f"color must be gray_only/luminance/reject, not {self.color!r}")
        if self.voi_index is not None and self.voi_index < 0:
            raise ValueError(f"voi_index must be >= 0 or None, not {self.voi_index}")
        if self.max_pixels < 1 or self.max_file_bytes < 1:
            raise ValueError("max_pixels and max_file_bytes must be positive")
        if not self.read_timeout_s > 0:  # also refuses NaN
            raise ValueError(f"read_timeout_s must be positive, not {self.read_timeout_s}")


DEFAULT_OPTIONS = DecodeOptions()
