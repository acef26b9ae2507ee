"""Turn any DICOM radiograph into a correct model input.

One package, used by preprocessing and by batch scoring alike, so training and
scoring can never see differently decoded pixels.

Normalization policy (in this order, following the DICOM grayscale pipeline,
PS3.4 N.2):

1. **Stored values** of the first frame (multi-frame files: frame 0 by default,
   or rejected with ``multi_frame`` when ``DecodeOptions.multiframe="reject"``).
2. **Modality LUT**: Rescale Slope/Intercept, or the Modality LUT Sequence.
3. **VOI**: the window (Window Center/Width with VOI LUT Function LINEAR,
   LINEAR_EXACT or SIGMOID) or the VOI LUT Sequence, the first one by default
   (``DecodeOptions.voi_index``; ``None`` ignores VOI). The VOI output is
   already in [0, 1]. A window under which fewer than 1% of the pixels are
   unsaturated describes some other image (edited pixels, copied headers)
   and is ignored (``intensity_source="window_ignored"``; the image is then
   scaled as in 4).
4. Without a usable VOI, **scale by the image's actual stored range**
   (:mod:`beam_pipelines.dicom.image_range`), mapped through the modality LUT,
   clipped to [0, 1]:

   * Smallest / Largest Image Pixel Value (0028,0106/0107) when they are true
     (``intensity_source="image_range"``): both present, smallest < largest,
     inside the stored bit range, at least 99% of a sample of the pixels
     (~128 x 128 means of 2 x 2 blocks, spread over the image) inside them, and the
     sample's robust span (below) covering at least half of them (a header
     that echoes the bit range over an image using a few percent of it is
     not the image's range);
   * else the 0.5th and 99.5th percentiles (nearest rank) of that sample
     (``intensity_source="percentiles"``).

   Either range is widened to at least 1/64 of the stored bit range (so a
   near-constant image does not stretch its noise to full contrast; a blank
   frame stays black, white or mid-grey) and never reaches past the bit range.
   A 16-bit image whose values span a few percent of the bit range thus gets
   full contrast instead of a flat mid-grey. ``DecodeOptions(range_source=
   "bit_range")`` restores the earlier rule: the stored bit range (Bits
   Stored, signed or not) through the modality LUT
   (``intensity_source="bit_range"``).
   Never a bare min/max, which one hot pixel would decide. Float pixel data
   has no bit range; it alone uses its min/max (``"min_max"``; a blank frame
   becomes 0).
5. **MONOCHROME1 is inverted** (1 - y) so higher always means brighter.

Colour input: pydicom converts YBR to RGB and palette colour through its LUT;
an image whose channels agree (a grayscale image saved as RGB, common in
secondary captures) becomes one channel; a truly coloured image is rejected
with ``unsupported_photometric`` (``DecodeOptions.color="luminance"`` keeps it
as ITU-R BT.601 luminance instead). Colour input is scaled by its full bit
scale (``intensity_source="bit_range"``), whatever ``range_source`` says.

Steps 2–5 are evaluated over every 8/16-bit value the header allows. When
the result is a clipped straight line (image or bit range, rescale, LINEAR
windows, inversion: nearly every radiograph) the pixels are mapped in one
pass by :mod:`beam_pipelines.dicom.pixel_map`; otherwise (LUT sequences, SIGMOID)
through one table gather. :func:`decode_model_input` also does the resize's first
box average in that pass, so the full-size float image is never made.

Per-file problems raise :class:`DicomRejected` with a stable ``reason`` code;
nothing else escapes for them. Details never carry header values (PHI).

The modules, in the order a file goes through them: :mod:`~.reading` (the
source's bytes, bounded), :mod:`~.dataset` (Part 10 parsing, deflate
inflation), :mod:`~.header` (the recorded fields), :mod:`~.frames` (guards,
frame 0's stored values) or :mod:`~.reduced` (at a reduced resolution),
:mod:`~.intensity` with :mod:`~.image_range` and :mod:`~.pixel_map` (steps
2-5), :mod:`~.resize` (the model input); :mod:`~.decoding` wires them
together; :mod:`~.options` and :mod:`~.errors` hold what callers pass and
catch. Importing the package changes no process-wide state: the redaction of
pydicom's log messages is installed by the entry points
(:func:`beam_pipelines.privacy.install_log_filters`).
"""

from __future__ import annotations

from beam_pipelines.dicom.dataset import read_dataset
from beam_pipelines.dicom.decoding import (
    DECODE_ROUTES,
    DecodedImage,
    decode,
    decode_model_input,
    read_image,
)
from beam_pipelines.dicom.errors import REJECT_REASONS, DicomRejected
from beam_pipelines.dicom.header import COLOR, GRAYSCALE, DicomHeader, read_header
from beam_pipelines.dicom.options import DEFAULT_OPTIONS, DecodeOptions, RangeSource
from beam_pipelines.dicom.reading import Source, read_source_bytes
from beam_pipelines.dicom.resize import (
    MODEL_INPUT_SIZE,
    ResizePolicy,
    content_shape,
    to_model_input,
)

# Defined in beam_pipelines.privacy; re-exported for users who redact
# decode errors as dicom.redact (its import path before the privacy module).
from beam_pipelines.privacy import redact

__all__ = [
    "COLOR",
    "DECODE_ROUTES",
    "DEFAULT_OPTIONS",
    "GRAYSCALE",
    "MODEL_INPUT_SIZE",
    "REJECT_REASONS",
    "DecodeOptions",
    "DecodedImage",
    "DicomHeader",
    "DicomRejected",
    "RangeSource",
    "ResizePolicy",
    "Source",
    "content_shape",
    "decode",
    "decode_model_input",
    "read_source_bytes",
    "read_dataset",
    "read_header",
    "read_image",
    "redact",
    "to_model_input",
]
