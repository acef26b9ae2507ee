"""Turn any DICOM radiograph into a correct model input.

One module, used by preprocessing and by batch scoring alike, so training and
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
   and is ignored (``voi="window_ignored"``; the image is then scaled as in 4).
4. Without a usable VOI, **scale by the image's actual stored range**
   (:func:`_image_range`), mapped through the modality LUT, clipped to [0, 1]:

   * Smallest / Largest Image Pixel Value (0028,0106/0107) when they are true
     (``voi="image_range"``): both present, smallest < largest, inside the
     stored bit range, at least 99% of a sample of the pixels (~128 x 128
     means of 2 x 2 blocks, spread over the image) inside them, and the
     sample's robust span (below) covering at least half of them (a header
     that echoes the bit range over an image using a few percent of it is
     not the image's range);
   * else the 0.5th and 99.5th percentiles (nearest rank) of that sample
     (``voi="percentiles"``).

   Either range is widened to at least 1/64 of the stored bit range (so a
   near-constant image does not stretch its noise to full contrast; a blank
   frame stays black, white or mid-grey) and never reaches past the bit range.
   A 16-bit image whose values span a few percent of the bit range thus gets
   full contrast instead of a flat mid-grey. ``DecodeOptions(range_source=
   "bit_range")`` restores the earlier rule: the stored bit range (Bits
   Stored, signed or not) through the modality LUT (``voi="bit_range"``).
   Never a bare min/max, which one hot pixel would decide. Float pixel data
   has no bit range; it alone uses its min/max (``"min_max"``; a blank frame
   becomes 0).
5. **MONOCHROME1 is inverted** (1 - y) so higher always means brighter.

Colour input: pydicom converts YBR to RGB and palette colour through its LUT;
an image whose channels agree (a grayscale image saved as RGB, common in
secondary captures) becomes one channel; a truly coloured image is rejected
with ``unsupported_photometric`` (``DecodeOptions.color="luminance"`` keeps it
as ITU-R BT.601 luminance instead). Colour input is scaled by its full bit
scale (``voi="bit_range"``), whatever ``range_source`` says.

Steps 2–5 are evaluated over every 8/16-bit value the header allows. When
the result is a clipped straight line (image or bit range, rescale, LINEAR
windows, inversion: nearly every radiograph) the pixels are mapped in one
pass by :mod:`beam_pipelines.dicom.pixel_map`; otherwise (LUT sequences, SIGMOID)
through one table gather. :func:`decode_model_input` also does the resize's first
box average in that pass, so the full-size float image is never made.

Per-file problems raise :class:`DicomRejected` with a stable ``reason`` code;
nothing else escapes for them. Details never carry header values (PHI).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import stat
import time
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO, Literal, NamedTuple

import numpy as np
import pydicom
import pydicom.encaps
from pydicom import filereader
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from beam_pipelines.dicom import pixel_map
from beam_pipelines.dicom import reduced as reduced_decode
from beam_pipelines.privacy import quiet_plugin_errors, redact

logger = logging.getLogger(__name__)

#: Every reason :class:`DicomRejected` can carry; stable machine codes.
REJECT_REASONS: frozenset[str] = frozenset(
    {
        "missing_file",
        "unreadable",
        "empty_file",
        "not_dicom",
        "truncated",
        "no_pixel_data",
        "pixel_length_mismatch",
        "unsupported_photometric",
        "unsupported_transfer_syntax",
        "unsupported_pixel_format",
        "multi_frame",
        "too_large",
        "decode_failed",
    }
)

Source = str | bytes | bytearray | memoryview | BinaryIO

#: Side of the square model input, in pixels.
MODEL_INPUT_SIZE = 224
# Pillow's resize box-averages by an integer factor down to within this
# factor of the target, then filters.
_REDUCING_GAP = 2.0
ResizePolicy = Literal["pad", "stretch"]
#: What an image without a usable VOI is scaled by (:attr:`DecodeOptions.range_source`).
RangeSource = Literal["image", "bit_range"]

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
COLOR = (
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_PARTIAL_420",
    "YBR_ICT",
    "YBR_RCT",
    "PALETTE COLOR",
)
# Channels of a "grayscale saved as colour" image differ by at most this
# fraction of full scale on average (lossy YBR round trips add a little).
_GRAY_TOLERANCE = 0.01


class DicomRejected(Exception):
    """A file that cannot become a model input, with a stable reason code.

    Attributes:
        reason: one of :data:`REJECT_REASONS`.
        detail: a human explanation free of header values.
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        # Beam pickles exceptions across processes; keep both fields.
        return (DicomRejected, (self.reason, self.detail))


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
        reduced_resolution: let :func:`decode_model_input` decode JPEG 2000
            and 8-bit JPEG at a reduced resolution that is still at least the
            model input's size (see :mod:`beam_pipelines.dicom.reduced`);
            False always decodes every pixel.
    """

    voi_index: int | None = 0
    multiframe: Literal["first", "reject"] = "first"
    color: Literal["gray_only", "luminance", "reject"] = "gray_only"
    max_pixels: int = 64_000_000
    max_file_bytes: int = 2 * 1024**3
    reduced_resolution: bool = True
    read_timeout_s: float = 300.0
    range_source: RangeSource = "image"

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


@dataclasses.dataclass(frozen=True)
class DicomHeader:
    """The header fields the pipeline records for each image.

    ``patient_id`` is PHI: it fills the predictions of archives scored without
    metadata.csv, and is never logged.
    """

    rows: int
    columns: int
    number_of_frames: int
    samples_per_pixel: int
    photometric_interpretation: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    transfer_syntax_uid: str
    modality: str
    patient_id: str
    study_id: str
    view_position: str
    patient_age: int | None
    patient_sex: str | None
    sop_instance_uid: str
    pixel_spacing: tuple[float, float] | None

    def as_dict(self) -> dict[str, Any]:
        """Returns the fields as a plain dict (JSON-friendly)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """A decoded image and the header it came with.

    Attributes:
        image: 2-D float32 in [0, 1], display sense; original resolution
            unless ``reduction`` > 1.
        header: the recorded header fields.
        inverted: True when MONOCHROME1 was inverted.
        voi: which intensity mapping was used (preprocessing counts it as
            ``intensity_<voi>``): ``"window"`` or ``"voi_lut"`` (the
            header's VOI); without one, ``"image_range"`` (scaled by the
            header's true Smallest / Largest Image Pixel Value) or
            ``"percentiles"`` (by the 0.5th / 99.5th percentiles of the
            pixels); ``"window_ignored"`` (the window missed the image, which
            was then scaled like one without a window); ``"bit_range"`` (by
            the whole stored bit range: ``range_source="bit_range"``, colour
            input, or an image range the modality LUT flattens to nothing);
            ``"min_max"`` (float pixel data only).
        color_converted: True when a colour encoding was reduced to gray.
        path: how the pixels were decoded: ``"full"``, ``"j2k_reduced"`` (a
            JPEG 2000 resolution level) or ``"jpeg_scaled"`` (JPEG DCT scaling).
        reduction: each side of ``image`` is the original's divided by this
            (rounded up); 1 on the full path.
    """

    image: np.ndarray
    header: DicomHeader
    inverted: bool
    voi: str
    color_converted: bool
    path: str = "full"
    reduction: int = 1


#: Every value of :attr:`DecodedImage.path`.
DECODE_PATHS: tuple[str, ...] = ("full", "j2k_reduced", "jpeg_scaled")


# --------------------------------------------------------------------------
# Reading


def read_bytes(
    source: Source,
    max_bytes: int = DEFAULT_OPTIONS.max_file_bytes,
    read_timeout_s: float = DEFAULT_OPTIONS.read_timeout_s,
) -> bytes:
    """Reads a file's bytes from a path/URI (Beam FileSystems), bytes or a file object.

    A local path (no scheme, or ``file://``) must name a regular file (or a
    symlink to one): a FIFO, socket, device or directory is refused before
    any byte is read. A remote read, or a file object of unknown size, stops
    after ``read_timeout_s`` seconds.

    Raises:
        DicomRejected: ``missing_file``, ``unreadable``, ``empty_file`` or
            ``too_large``.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif isinstance(source, str):
        data = _read_path(source, max_bytes, read_timeout_s)
    else:
        data = _read_limited(source, max_bytes, read_timeout_s)
    if not data:
        raise DicomRejected("empty_file", "the file has no bytes")
    if len(data) > max_bytes:
        raise DicomRejected("too_large", f"file is larger than {max_bytes} bytes")
    return data


def _read_path(path: str, max_bytes: int, timeout_s: float) -> bytes:
    from beam_pipelines.storage.files import is_local, local_path

    if is_local(path):
        return _read_local(local_path(path), max_bytes, timeout_s)
    # Imported lazily: Beam's FileSystems pulls in the whole SDK.
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        # UNCOMPRESSED: a DICOM named *.gz must not be silently gunzipped.
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return _read_limited(handle, max_bytes, timeout_s)
    except FileNotFoundError as exc:
        raise DicomRejected("missing_file", "no file at the given path") from exc
    except OSError as exc:
        # Beam wraps "not found" in BeamIOError (an OSError) on some filesystems.
        if not FileSystems.exists(path):
            raise DicomRejected("missing_file", "no file at the given path") from exc
        raise DicomRejected("unreadable", f"{type(exc).__name__}: {redact(exc)}") from exc


# Opening a FIFO blocks until a writer appears (forever, in an archive), and
# a terminal would become the worker's controlling terminal.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
_FILE_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def _not_regular(mode: int) -> DicomRejected | None:
    """The reject for a file that is not a regular one (a FIFO, a device...), else None."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "special file")
    return DicomRejected("unreadable", f"not a regular file ({kind})")


def _read_local(path: str, max_bytes: int, timeout_s: float) -> bytes:
    """Reads a local regular file; anything else is refused before a byte is read.

    ``stat`` first, so a device is never even opened (opening one can have
    effects: a tape rewinds, a watchdog arms); then ``fstat`` on the opened
    descriptor, so a path swapped in between is caught too. /dev/zero would
    otherwise be read up to the size limit and a FIFO would hang the job.
    """
    try:
        rejected = _not_regular(os.stat(path).st_mode)
        if rejected is not None:
            raise rejected
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise DicomRejected("missing_file", "no file at the given path") from exc
    except OSError as exc:
        raise DicomRejected("unreadable", f"{type(exc).__name__}: {redact(exc)}") from exc
    try:
        rejected = _not_regular(os.fstat(fd).st_mode)
        if rejected is not None:
            raise rejected
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)  # a FUSE mount (gcsfuse, s3fs) may honour it
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    try:
        with handle:
            return _read_limited(handle, max_bytes, timeout_s)
    except OSError as exc:
        raise DicomRejected("unreadable", f"{type(exc).__name__}: {redact(exc)}") from exc


def _read_limited(handle: BinaryIO, max_bytes: int, timeout_s: float) -> bytes:
    """Reads at most ``max_bytes + 1`` bytes without allocating that much up front.

    ``read(n)`` reserves n bytes first, which costs milliseconds for a
    2 GiB limit; a local file's size is known, a remote one is read in
    chunks, and given up on (``unreadable``) once that has taken longer than
    ``timeout_s``: a stalled object store must not hold a worker forever.
    """
    try:
        size: int | None = os.fstat(handle.fileno()).st_size
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        size = None
    if size is not None:
        if size > max_bytes:
            raise DicomRejected("too_large", f"file is larger than {max_bytes} bytes")
        return handle.read(size + 1)
    chunks, total = [], 0
    started = time.monotonic()
    while total <= max_bytes:
        if time.monotonic() - started > timeout_s:
            raise DicomRejected(
                "unreadable",
                f"reading took longer than {timeout_s:g} s (stopped after {total} bytes)",
            )
        chunk = handle.read(min(16 << 20, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_dataset(source: Source, options: DecodeOptions = DEFAULT_OPTIONS) -> Dataset:
    """Parses a DICOM file (header and pixel data bytes, nothing decoded yet).

    Part 10 files are read without ``force``. A file without the Part 10
    preamble is accepted only when it starts like a raw little-endian DICOM
    data set (a group 0x0008 tag); its transfer syntax is then inferred.
    A deflated data set is inflated within the size its header declares
    (:func:`_inflate_data_set`), then read like an uncompressed one; its
    header still reports the deflated transfer syntax.

    Raises:
        DicomRejected: for unreadable, empty, non-DICOM, truncated or
            (inflating past its declared size) too large input.
    """
    data = read_bytes(source, options.max_file_bytes, options.read_timeout_s)
    meta = _file_meta(data)
    deflated = meta.syntax == pydicom.uid.DeflatedExplicitVRLittleEndian
    parsed = _inflate_data_set(data, meta, options) if deflated else data
    byte_order = None
    if data[128:132] == b"DICM":
        # Inflated, a deflated data set is Explicit VR Little Endian.
        byte_order = "<" if deflated else _UNCOMPRESSED_BYTE_ORDER.get(meta.syntax or "")
    ds: Dataset
    try:
        # Uncompressed pixel data stays unread (deferred): decode() views it
        # in ``parsed`` directly instead of copying 10 MB twice.
        ds = pydicom.dcmread(io.BytesIO(parsed), defer_size=_DEFER_BYTES if byte_order else None)
    except InvalidDicomError as exc:
        if not _looks_like_raw_dataset(parsed):
            raise DicomRejected("not_dicom", "no DICM prefix and no DICOM data set") from exc
        ds = _read_raw_dataset(parsed)
    except EOFError as exc:
        raise DicomRejected("truncated", "the file ends inside the header") from exc
    except Exception as exc:  # pydicom raises many types for malformed headers
        raise DicomRejected("not_dicom", f"header could not be parsed: {redact(exc)}") from exc
    _infer_transfer_syntax(ds)
    if _ends_early(ds, len(parsed)):
        raise DicomRejected("truncated", "an element's declared length runs past the end of file")
    if deflated:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.__dict__["_xray_file_size"] = len(data)  # on disk: the deflated size, if deflated
    if byte_order:
        # What the elements' offsets (value_tell) point into: the inflated bytes.
        ds.__dict__["_xray_bytes"] = parsed
        ds.__dict__["_xray_byte_order"] = byte_order
    return ds


_DEFER_BYTES = 1 << 16
_UNCOMPRESSED_BYTE_ORDER: dict[str, str] = {
    pydicom.uid.ExplicitVRLittleEndian: "<",
    pydicom.uid.ImplicitVRLittleEndian: "<",
    pydicom.uid.ExplicitVRBigEndian: ">",
}


class _FileMeta(NamedTuple):
    """The file meta group (0002) as dcmread reads it (:func:`_file_meta`)."""

    syntax: str | None  # (0002,0010) Transfer Syntax UID
    syntax_value: tuple[int, int]  # (offset, length) of its value in the file
    end: int  # offset of the first byte after the group: where the data set starts


def _not_meta(tag: int, vr: str | None, length: int) -> bool:
    return tag >> 16 != 0x0002


def _file_meta(data: bytes) -> _FileMeta:
    """The file meta group, found where dcmread looks for it and read the way it does.

    After the "DICM" prefix, or at the start of a raw data set (dcmread
    with ``force``). Not via dcmread: for a deflated file it inflates the
    whole data set, unbounded, before anything could check its size.
    """
    fp = io.BytesIO(data)
    fp.seek(132 if data[128:132] == b"DICM" else 0)
    start = fp.tell()
    try:
        meta = filereader.read_dataset(fp, False, True, stop_when=_not_meta)
        syntax = meta.get_item(0x00020010)  # taken raw, before any element converts
        try:
            first = next(meta.elements(), None)
            if first is not None:
                meta[first.tag]
        except NotImplementedError:
            # pydicom re-reads a group whose first element has an unknown VR
            # as implicit VR (its issue 503); so do we, to agree on the syntax.
            fp.seek(start)
            meta = filereader.read_dataset(fp, True, True, stop_when=_not_meta)
            syntax = meta.get_item(0x00020010)
    except Exception:  # dcmread fails on it the same way, and says why
        return _FileMeta(None, (0, 0), start)
    if not isinstance(syntax, RawDataElement) or not isinstance(syntax.value, bytes):
        return _FileMeta(None, (0, 0), fp.tell())
    # As pydicom decodes a UI value: Latin-1, trailing NULs and spaces dropped.
    uid = syntax.value.decode("latin-1").rstrip("\0 ")
    return _FileMeta(uid, (syntax.value_tell, len(syntax.value)), fp.tell())


# Every element before the pixel data of a deflated data set must fit in the
# first inflated bytes, which are inflated unchecked: a header takes a few
# KB, a large private block a few hundred KB; icons and overlays fit too.
_DEFLATE_HEADER_ALLOWANCE = 16 << 20
# Elements after the pixel data (padding, signatures) may add this much to
# what the header declares.
_DEFLATE_TRAILER_ALLOWANCE = 1 << 20
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
# Headers have hundreds of top-level elements; 16 MiB of tiny ones (runs of
# zeros read as elements) would take pydicom 8 s to read.
_MAX_HEADER_ELEMENTS = 1 << 16


def _inflate_data_set(data: bytes, meta: _FileMeta, options: DecodeOptions) -> bytes:
    """A deflated file as Part 10 bytes in Explicit VR Little Endian, inflated within bounds.

    pydicom would inflate the whole data set first: a 2 MB file that
    inflates to 2 GiB took 4.3 GB of memory, or failed with whatever error
    the machine's memory gave. Here the first
    :data:`_DEFLATE_HEADER_ALLOWANCE` bytes are inflated as they come; a
    longer data set must declare its size in them (:func:`_inflation_budget`)
    and is never inflated past that. No data set inflates past
    ``options.max_file_bytes``. The file meta is kept byte for byte but for
    the Transfer Syntax UID, rewritten in place (NUL padded) to Explicit VR
    Little Endian, so dcmread reads the result as an uncompressed file.

    Raises:
        DicomRejected: ``too_large`` past a bound, ``not_dicom`` for a
            corrupt deflate stream.
    """
    at, length = meta.syntax_value
    out = io.BytesIO()
    out.write(data[:at])
    out.write(pydicom.uid.ExplicitVRLittleEndian.encode("ascii").ljust(length, b"\0"))
    out.write(data[at + length : meta.end])
    start = out.tell()
    inflater = _Inflater(memoryview(data)[meta.end :])
    limit = min(_DEFLATE_HEADER_ALLOWANCE, options.max_file_bytes)
    size = inflater.inflate_into(out, limit + 1)
    if size > limit:
        if limit == options.max_file_bytes:
            raise DicomRejected(
                "too_large", f"the deflated data set inflates past {limit} bytes (max_file_bytes)"
            )
        budget = _inflation_budget(out, start, options)
        size += inflater.inflate_into(out, budget - size + 1)
        if size > budget:
            raise DicomRejected(
                "too_large",
                f"the deflated data set inflates past the {budget} bytes its header declares "
                "(Rows x Columns x frames x bits + allowances)",
            )
    # A stream cut short is inflated as far as it goes: _ends_early then
    # judges the inflated bytes as it does an uncompressed file.
    return out.getvalue()  # the buffer itself, not a copy


class _Inflater:
    """A raw deflate stream, inflated on demand and never further than asked.

    zlib's ``max_length`` bounds each step's output; the input goes in
    1 MiB pieces, so the unconsumed input zlib hands back stays small.
    """

    _INPUT_PIECE = 1 << 20
    _OUTPUT_STEP = 1 << 20

    def __init__(self, deflated: memoryview) -> None:
        self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
        self._deflated = deflated
        self._at = 0
        self._pending: bytes | memoryview = b""

    def inflate_into(self, out: BinaryIO, limit: int) -> int:
        """Writes up to ``limit`` inflated bytes to ``out``, fewer only at the stream's end.

        Returns:
            The number of bytes written.

        Raises:
            DicomRejected: ``not_dicom`` for a corrupt stream.
        """
        written = 0
        while written < limit and not self._zlib.eof:
            if not self._pending and self._at < len(self._deflated):
                self._pending = self._deflated[self._at : self._at + self._INPUT_PIECE]
                self._at += len(self._pending)
            try:
                chunk = self._zlib.decompress(
                    self._pending, min(limit - written, self._OUTPUT_STEP)
                )
            except zlib.error as exc:
                raise DicomRejected(
                    "not_dicom", f"the deflated data set is corrupt: {redact(exc)}"
                ) from exc
            self._pending = self._zlib.unconsumed_tail
            if not chunk and not self._pending and self._at >= len(self._deflated):
                break  # the input ran out before the end of the stream
            out.write(chunk)
            written += len(chunk)
        return written


def _inflation_budget(out: io.BytesIO, start: int, options: DecodeOptions) -> int:
    """How many inflated bytes a deflated data set may hold, from its first inflated bytes.

    The elements before the pixel data (``out`` from ``start``, up to the
    first pixel data tag), the pixel data its header declares (Rows x
    Columns x SamplesPerPixel, at most ``max_pixels`` since more is rejected
    anyway, x NumberOfFrames x whole bytes of BitsAllocated) and
    :data:`_DEFLATE_TRAILER_ALLOWANCE`.

    Raises:
        DicomRejected: ``too_large`` when the inflated bytes hold no pixel
            data tag (the size cannot be bounded) or the budget is larger
            than ``options.max_file_bytes``.
    """
    found, elements = False, 0

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        nonlocal found, elements
        found, elements = tag in _PIXEL_TAGS, elements + 1
        return found or elements > _MAX_HEADER_ELEMENTS

    out.seek(start)
    try:
        head = filereader.read_dataset(out, False, True, stop_when=at_pixels, defer_size=1024)
        header_bytes = out.tell() - start
    except Exception:  # a broken header; no pixel data found in it
        found = False
    finally:
        out.seek(0, io.SEEK_END)
    if not found:
        raise DicomRejected(
            "too_large",
            f"the deflated data set has no pixel data in its first {out.tell() - start} bytes: "
            "its size cannot be bounded",
        )
    rows, cols = max(0, _int(head, "Rows")), max(0, _int(head, "Columns"))
    samples = max(0, _int(head, "SamplesPerPixel", 1))
    frames = max(1, _int(head, "NumberOfFrames", 1))
    sample_bytes = -(-max(0, _int(head, "BitsAllocated")) // 8)
    pixels = min(rows * cols * samples, options.max_pixels)
    budget = header_bytes + pixels * frames * sample_bytes + _DEFLATE_TRAILER_ALLOWANCE
    if budget > options.max_file_bytes:
        raise DicomRejected(
            "too_large",
            f"the deflated data set's header declares {budget} bytes, more than "
            f"max_file_bytes ({options.max_file_bytes} bytes)",
        )
    return budget


def _ends_early(ds: Dataset, file_size: int) -> bool:
    """True when a top-level element declares more bytes than the file holds.

    pydicom stops quietly at the end of a cut file; the declared lengths of
    the still-raw elements show it. A deflated data set is checked against
    its inflated bytes (``file_size`` is theirs).
    """
    meta_length = ds.file_meta.get("FileMetaInformationGroupLength")
    # Preamble (128) + "DICM" (4) + the group length element itself (12).
    if isinstance(meta_length, int) and 144 + meta_length > file_size:
        return True
    # Iterating a Dataset converts its elements; keys() keeps them raw.
    for tag in ds.keys():  # noqa: SIM118
        element = ds.get_item(tag, keep_deferred=True)
        length = getattr(element, "length", None)
        tell = getattr(element, "value_tell", None)
        if length not in (None, 0xFFFFFFFF) and tell is not None and tell + length > file_size:
            return True
    return False


def _looks_like_raw_dataset(data: bytes) -> bool:
    if len(data) < 8:
        return False
    group = int.from_bytes(data[0:2], "little")
    return group in (0x0002, 0x0008)


def _read_raw_dataset(data: bytes) -> Dataset:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except EOFError as exc:
        raise DicomRejected("truncated", "the file ends inside the header") from exc
    except Exception as exc:
        raise DicomRejected("not_dicom", f"header could not be parsed: {redact(exc)}") from exc
    if len(ds) == 0:
        raise DicomRejected("not_dicom", "no DICOM elements found")
    return ds


def _infer_transfer_syntax(ds: Dataset) -> None:
    """Records the encoding pydicom detected when the file meta lacks it.

    Old archives hold raw data sets (no Part 10 header) and some writers omit
    (0002,0010); the pixel decoders need to know what they are reading.
    """
    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = ds.original_encoding
    if implicit:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    elif little:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian


# --------------------------------------------------------------------------
# Header


def read_header(ds: Dataset) -> DicomHeader:
    """Extracts the fields the pipeline records (no pixel decoding).

    Malformed optional values (age, sex, spacing) become None, never errors.
    """
    from beam_pipelines.contracts.metadata import parse_age, parse_sex

    return DicomHeader(
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        number_of_frames=max(1, _int(ds, "NumberOfFrames", 1)),
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1),
        photometric_interpretation=_str(ds, "PhotometricInterpretation").upper(),
        bits_allocated=_int(ds, "BitsAllocated"),
        bits_stored=_int(ds, "BitsStored", _int(ds, "BitsAllocated")),
        pixel_representation=_int(ds, "PixelRepresentation"),
        transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")),
        modality=_str(ds, "Modality"),
        patient_id=_str(ds, "PatientID"),
        # StudyID is short and often blank; the instance UID always names the study.
        study_id=_str(ds, "StudyID") or _str(ds, "StudyInstanceUID"),
        view_position=_str(ds, "ViewPosition").upper(),
        patient_age=parse_age(_str(ds, "PatientAge")),
        patient_sex=parse_sex(_str(ds, "PatientSex")),
        sop_instance_uid=_str(ds, "SOPInstanceUID"),
        pixel_spacing=_spacing(ds),
    )


def _value(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # an undecodable value reads as absent
        return None


def _sequence(ds: Dataset, keyword: str) -> list[Dataset]:
    """A sequence's items; a tag written with another VR reads as absent."""
    value = _value(ds, keyword)
    if isinstance(value, pydicom.sequence.Sequence):
        return [item for item in value if isinstance(item, Dataset)]
    return []


def _int(ds: Dataset, keyword: str, default: int = 0) -> int:
    value = _value(ds, keyword)
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if value else None
    try:
        return int(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def _str(ds: Dataset, keyword: str) -> str:
    value = _value(ds, keyword)
    return "" if value is None else str(value).strip()


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _value(ds, keyword)
        try:
            if value is not None and len(value) == 2:
                return (float(value[0]), float(value[1]))
        except (TypeError, ValueError):
            continue
    return None


# --------------------------------------------------------------------------
# Decoding


def decode(source: Source | Dataset, options: DecodeOptions = DEFAULT_OPTIONS) -> DecodedImage:
    """Decodes and normalizes a DICOM image; see the module docstring for the policy.

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
    refuses, takes the full path; ``DecodedImage.path`` says which was used.

    Returns:
        The ``(size, size, 1)`` float32 model input and the decoded image.

    Raises:
        DicomRejected: for every per-file problem.
    """
    decoded = _decode(source, options, model_input=(size, policy))
    full_shape = (decoded.header.rows, decoded.header.columns)
    image = to_model_input(decoded.image, size, policy, full_shape, decoded.reduction)
    return image, decoded


def _box_factor(rows: int, cols: int, size: int, policy: ResizePolicy) -> int:
    """The integer box reduction :func:`to_model_input` starts with (Pillow's
    ``reducing_gap=2``), when equal on both axes; else 1."""
    target_rows, target_cols = content_shape(rows, cols, size, policy)
    factor_x = int(cols / target_cols / _REDUCING_GAP) or 1
    factor_y = int(rows / target_rows / _REDUCING_GAP) or 1
    return factor_x if factor_x == factor_y else 1


def _decode(
    source: Source | Dataset,
    options: DecodeOptions,
    model_input: tuple[int, ResizePolicy] | None = None,
) -> DecodedImage:
    ds = source if isinstance(source, Dataset) else read_dataset(source, options)
    try:
        header = read_header(ds)
    except Exception as exc:
        raise DicomRejected("not_dicom", f"header fields unreadable: {redact(exc)}") from exc
    pixel_keyword = _pixel_keyword(ds)
    _check_geometry(ds, header, pixel_keyword, options)
    if pixel_keyword == "PixelData" and UID(header.transfer_syntax_uid).is_encapsulated:
        _check_frame_header(ds, header)
    reduced = None
    if model_input is not None and options.reduced_resolution:
        minimum = content_shape(header.rows, header.columns, *model_input)
        reduced = _decode_reduced(ds, header, pixel_keyword, minimum)
    native = None
    if reduced is None:
        native = _native_view(ds, header)
        stored = native if native is not None else _decode_first_frame(ds, header)
        path, reduction = "full", 1
    else:
        stored, path, reduction = reduced
    photometric = header.photometric_interpretation
    if header.samples_per_pixel == 1 and photometric in GRAYSCALE:
        inverted = photometric == "MONOCHROME1"
        # The in-place view still holds the file's unused high bits.
        raw_bits = header.bits_stored if native is not None else None
        # A full decode for the model input is box-reduced while it is mapped.
        box = 1
        if model_input is not None and reduced is None:
            box = _box_factor(header.rows, header.columns, *model_input)
        image, voi, boxed = _normalize_gray(
            stored, ds, header, options, pixel_keyword, inverted, raw_bits, box
        )
        return DecodedImage(image, header, inverted, voi, False, path, reduction * boxed)
    image = _color_to_gray(stored, ds, header, options)
    return DecodedImage(image, header, inverted=False, voi="bit_range", color_converted=True)


def read_image(source: Source | Dataset, options: DecodeOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """Returns the image as 2-D float32 in [0, 1], original resolution, display sense.

    Raises:
        DicomRejected: for every per-file problem, with a stable reason code.
    """
    return decode(source, options).image


def _pixel_keyword(ds: Dataset) -> str:
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            return keyword
    raise DicomRejected("no_pixel_data", "the data set has no pixel data element")


def _check_geometry(ds: Dataset, header: DicomHeader, keyword: str, options: DecodeOptions) -> None:
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


def _native_view(ds: Dataset, header: DicomHeader) -> np.ndarray | None:
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


def _decode_first_frame(ds: Dataset, header: DicomHeader) -> np.ndarray:
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
    for plugin in _plugins(decoder.available_plugins, syntax):
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
    **dict.fromkeys(reduced_decode.J2K_SYNTAXES, ("pylibjpeg",)),
    **dict.fromkeys(reduced_decode.JPEG_SYNTAXES, ("pillow",)),
    "1.2.840.10008.1.2.5": ("pylibjpeg",),
}


def _plugins(available: tuple[str, ...], syntax: str = "") -> list[str]:
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


def _check_frame_header(ds: Dataset, header: DicomHeader) -> None:
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
    codestream = reduced_decode.read_codestream(first_fragment)
    if codestream is not None and codestream.tiles > _MAX_J2K_TILES:
        # Tiny tiles cost OpenJPEG ~500 MB and a second per file, whatever the size.
        raise DicomRejected(
            "decode_failed", f"the JPEG 2000 frame declares {codestream.tiles} tiles"
        )
    if codestream is not None:  # parsed once: JPEG 2000 needs no second look
        shape: tuple[int, int] | None = (codestream.rows, codestream.columns)
    else:
        shape = reduced_decode.frame_shape(first_fragment)
    if shape is not None and shape != (header.rows, header.columns):
        raise DicomRejected(
            "decode_failed",
            f"the compressed frame's header says {shape[0]}x{shape[1]}, "
            f"the DICOM header {header.rows}x{header.columns}",
        )


def _decode_reduced(
    ds: Dataset, header: DicomHeader, keyword: str, min_shape: tuple[int, int]
) -> tuple[np.ndarray, str, int] | None:
    """Frame 0 at a reduced resolution >= ``min_shape``, or None for the full path.

    Only grayscale single-sample JPEG 2000 / 8-bit JPEG whose codestream
    agrees with the header qualify; anything the fast decoder refuses falls
    back to the full decoder, which then decodes or rejects it.
    """
    syntax = header.transfer_syntax_uid
    if (
        keyword != "PixelData"
        or header.samples_per_pixel != 1
        or header.photometric_interpretation not in GRAYSCALE
        or syntax not in reduced_decode.J2K_SYNTAXES | reduced_decode.JPEG_SYNTAXES
    ):
        return None
    try:
        frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=header.number_of_frames)
        if syntax in reduced_decode.J2K_SYNTAXES:
            return _j2k_reduced(frame, header, min_shape)
        return _jpeg_scaled(frame, header, min_shape)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the full path decodes or rejects with a reason
        logger.debug("reduced decode refused (%s); decoding in full", type(exc).__name__)
        return None


def _j2k_reduced(
    frame: bytes, header: DicomHeader, min_shape: tuple[int, int]
) -> tuple[np.ndarray, str, int] | None:
    info = reduced_decode.read_codestream(frame)
    if (
        info is None
        or info.components != 1
        or (info.rows, info.columns) != (header.rows, header.columns)
        # A codestream that disagrees with the header gets pydicom's handling.
        or info.precision != header.bits_stored
        or info.signed != (header.pixel_representation == 1)
    ):
        return None
    level = info.level_for(min_shape)
    if level == 0 or not reduced_decode.j2k_available():
        return None
    stored = reduced_decode.decode_j2k_level(frame, level)
    if stored.shape != info.shape_at(level) or stored.dtype.kind not in "iu":
        return None
    return stored, "j2k_reduced", 1 << level


def _jpeg_scaled(
    frame: bytes, header: DicomHeader, min_shape: tuple[int, int]
) -> tuple[np.ndarray, str, int] | None:
    if header.bits_allocated != 8 or header.pixel_representation != 0:
        return None
    scaled = reduced_decode.decode_jpeg_scaled(frame, min_shape)
    if scaled is None:
        return None
    stored, scale = scaled
    expected = (-(-header.rows // scale), -(-header.columns // scale))
    if stored.shape != expected:
        return None
    return stored, "jpeg_scaled", scale


def _normalize_gray(
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

    ``raw_bits``: ``stored`` is a view of the file (:func:`_native_view`):
    any byte order, and only its low ``raw_bits`` bits hold the value.
    ``reduce_by``: the caller only needs the image box-averaged by this
    factor (:func:`decode_model_input`); it is made without the full-size
    image where the one-pass kernel can. Returns (image, mode, reduction).
    """
    if keyword != "PixelData" or stored.dtype.kind == "f":
        image, mode = _normalize_float(stored, ds, options)
        return (1.0 - image if invert else image), mode, 1
    values = None
    if options.range_source == "image":
        # Sampled only for an image without a (usable) window: windowed ones
        # pay nothing for it.
        values = lambda: _range_sample(stored, raw_bits)  # noqa: E731
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


def _range_sample(stored: np.ndarray, raw_bits: int | None) -> np.ndarray:
    """About 128 x 128 clean stored values spread over the image, each a 2 x 2 block mean.

    Clean: native order, unused high bits dropped. The block mean (where the
    stride leaves room for it) halves the pixel noise, which otherwise
    widens a full decode's percentiles against those of a reduced-resolution
    decode (smoothed by the codec): on a 2500 x 2048 phantom the fast vs full
    model input difference falls from 0.0096 to 0.0055 (JPEG 2000) and
    0.0082 to 0.0026 (JPEG) against 256 x 256 single pixels, at the same
    cost (~0.15 ms: as many pixels read). float32 holds these means exactly.
    """
    rows, cols = stored.shape
    step_rows = max(1, rows // _RANGE_SAMPLE_POINTS)
    step_cols = max(1, cols // _RANGE_SAMPLE_POINTS)
    block_rows, block_cols = min(2, step_rows), min(2, step_cols)
    # Points whose whole block lies inside the image.
    count_rows = (rows - block_rows) // step_rows + 1
    count_cols = (cols - block_cols) // step_cols + 1
    dtype = np.dtype(np.float32 if stored.dtype.itemsize <= 2 else np.float64)
    total: np.ndarray = np.zeros((count_rows, count_cols), dtype=dtype)
    for top in range(block_rows):
        for left in range(block_cols):
            part = stored[top::step_rows, left::step_cols][:count_rows, :count_cols]
            total += pixel_map.stored_values(np.ascontiguousarray(part), raw_bits)
    total /= block_rows * block_cols
    return total


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


# Modes that come from the header's VOI; a window may miss the image.
_VOI_MODES = ("window", "voi_lut")
# Robust ends of an image without a window: 0.5% of the sampled block means
# may clip at each end (somewhat more of the noisier single pixels), so
# burned-in markers, collimator edges and dead pixels do not decide the
# contrast of the rest. Over the ~16k-value sample that is ~80 values each
# side: stable, and little moved by the smoothing of a reduced-resolution
# decode (0.1 / 99.9 gave 1.2-1.6x the fast vs full difference on a
# phantom; 1 / 99 clips twice as much for no gain).
_RANGE_PERCENTILES = (0.5, 99.5)
# Side of the grid of 2 x 2 blocks the image range is estimated from.
_RANGE_SAMPLE_POINTS = 128
# The image range spans at least this fraction of the stored bit range:
# 1024 values at 16 bits, 64 at 12, 4 at 8. A 16-bit image spanning 2% of
# its range still gets full contrast; a blank frame's noise does not.
_MIN_RANGE_FRACTION = 1 / 64
# Smallest / Largest Image Pixel Value are believed when at least this share
# of the sampled pixels lies inside them ...
_HEADER_RANGE_INSIDE = 0.99
# ... and the pixels' percentile span covers at least this share of them.
_HEADER_RANGE_COVERAGE = 0.5


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
    (:func:`_range_sample`); given, an image without VOI is scaled by its
    own range (:func:`_image_range`), else by the bit range.
    """
    modality, lo, hi = _modality_transform(ds, header)
    voi = _voi_transform(ds, voi_index) if voi_index is not None else None
    mode = "bit_range"
    if voi is not None:
        voi_fn, mode = voi
        forward: Callable[[np.ndarray], np.ndarray] = lambda x: voi_fn(modality(x))  # noqa: E731
    else:
        if values is not None:
            stored_lo, stored_hi, source = _image_range(ds, header, values())
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


def _image_range(ds: Dataset, header: DicomHeader, values: np.ndarray) -> tuple[float, float, str]:
    """The stored values ``[lo, hi]`` the image occupies and their source (module docstring, 4).

    ``"image_range"``: Smallest / Largest Image Pixel Value, when true of
    the sampled ``values`` (:func:`_range_sample`); else ``"percentiles"``:
    their 0.5th and 99.5th percentiles. Either is widened to
    :data:`_MIN_RANGE_FRACTION` of the bit range and kept inside it. The
    same rule on a reduced-resolution decode picks the same header range
    and nearly the same percentiles (smoothing moves the 0.5% tails
    little), so both paths agree.
    """
    smin, smax = _stored_range(header)
    flat = values.reshape(-1)
    low, high = _percentiles(flat)
    lo, hi, source = low, high, "percentiles"
    claimed = _header_pixel_range(ds, header, smin, smax)
    if claimed is not None:
        small, large = claimed
        # Lossy codecs overshoot the original extremes a little: hence 99%,
        # not all.
        inside = np.count_nonzero((flat >= small) & (flat <= large))
        holds = inside >= _HEADER_RANGE_INSIDE * flat.size
        # A claimed range over twice the pixels' robust span (the bit range
        # echoed, a single hot pixel) would leave the image grey.
        tight = high - low >= _HEADER_RANGE_COVERAGE * (large - small)
        if holds and tight:
            lo, hi, source = float(small), float(large), "image_range"
    lo, hi = max(lo, smin), min(hi, smax)
    min_span = (smax - smin) * _MIN_RANGE_FRACTION
    if hi - lo < min_span:
        # Centred on the pixels, shifted back inside the bit range: a blank
        # frame stays black (or white, or mid-grey) and its noise is not
        # stretched to full contrast.
        lo = min(max((lo + hi - min_span) / 2, smin), smax - min_span)
        hi = lo + min_span
    return lo, hi, source


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    """The :data:`_RANGE_PERCENTILES` of ``values`` (nearest rank: no interpolation)."""
    n = values.size
    ranks = [max(0, math.ceil(n * p / 100) - 1) for p in _RANGE_PERCENTILES]
    # One partial sort for both ranks (~0.05 ms for 16k values), no full sort.
    ordered = np.partition(values, ranks)
    return float(ordered[ranks[0]]), float(ordered[ranks[1]])


def _header_pixel_range(
    ds: Dataset, header: DicomHeader, smin: int, smax: int
) -> tuple[int, int] | None:
    """Smallest / Largest Image Pixel Value (stored values) if both are usable, else None."""
    ends = []
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        value = _value(ds, keyword)
        if isinstance(value, pydicom.multival.MultiValue) and len(value) == 1:
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int):
            return None  # absent, or a VR pydicom could not resolve to US / SS
        # Written as US although the pixels are signed (two's complement).
        if header.pixel_representation == 1 and 1 << 15 <= value < 1 << 16:
            value -= 1 << 16
        ends.append(value)
    small, large = ends
    if not smin <= small < large <= smax:
        return None
    return small, large


def _stored_range(header: DicomHeader) -> tuple[int, int]:
    """The smallest and largest stored value Bits Stored and the sign allow."""
    bits = (
        header.bits_stored
        if 0 < header.bits_stored <= header.bits_allocated
        else (header.bits_allocated)
    )
    return pixel_map.bit_range(bits, header.pixel_representation == 1)


def _modality_transform(
    ds: Dataset, header: DicomHeader
) -> tuple[Callable[[np.ndarray], np.ndarray], float, float]:
    """Returns the modality LUT and the range of its output over the stored range."""
    smin, smax = _stored_range(header)

    sequence = _sequence(ds, "ModalityLUTSequence")
    if sequence:
        lut = _lut_from_item(sequence[0])
        if lut is not None:
            # Inputs outside the table clamp to its ends, so the table's own
            # extremes are the exact range of the output.
            first, table = lut
            return (lambda x: _apply_lut(x, first, table)), float(table.min()), float(table.max())

    slope = _float(ds, "RescaleSlope", 1.0) or 1.0
    intercept = _float(ds, "RescaleIntercept", 0.0)
    lo, hi = sorted((smin * slope + intercept, smax * slope + intercept))
    return (lambda x: x * slope + intercept), lo, hi


def _voi_transform(
    ds: Dataset, index: int
) -> tuple[Callable[[np.ndarray], np.ndarray], str] | None:
    sequence = _sequence(ds, "VOILUTSequence")
    if sequence and len(sequence) > index:
        lut = _lut_from_item(sequence[index])
        if lut is not None:
            # The descriptor's bit depth is often wrong in the wild; the
            # table's extremes are the range it really produces.
            first, table = lut
            lo, span = float(table.min()), float(table.max() - table.min())
            if span > 0:
                return (lambda x: (_apply_lut(x, first, table) - lo) / span), "voi_lut"

    centers = _floats(ds, "WindowCenter")
    widths = _floats(ds, "WindowWidth")
    if len(centers) > index and len(widths) > index:
        center, width = centers[index], widths[index]
        function = _str(ds, "VOILUTFunction").upper() or "LINEAR"
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
    slope = _float(ds, "RescaleSlope", 1.0) or 1.0
    values = values * slope + _float(ds, "RescaleIntercept", 0.0)
    voi = _voi_transform(ds, options.voi_index) if options.voi_index is not None else None
    if voi is not None:
        return np.clip(voi[0](values), 0, 1).astype(np.float32), voi[1]
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(values.shape, np.float32), "min_max"
    scaled = np.nan_to_num((values - lo) / (hi - lo), nan=0.0)
    return np.clip(scaled, 0, 1).astype(np.float32), "min_max"


def _color_to_gray(
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


def _float(ds: Dataset, keyword: str, default: float) -> float:
    values = _floats(ds, keyword)
    return values[0] if values else default


def _floats(ds: Dataset, keyword: str) -> list[float]:
    value = _value(ds, keyword)
    if value is None or value == "":
        return []
    items = value if isinstance(value, pydicom.multival.MultiValue | list | tuple) else [value]
    out = []
    for item in items:
        try:
            number = float(item)
        except (TypeError, ValueError):
            return []
        if not np.isfinite(number):
            return []
        out.append(number)
    return out


# --------------------------------------------------------------------------
# Model input


def content_shape(
    rows: int, cols: int, size: int = MODEL_INPUT_SIZE, policy: ResizePolicy = "pad"
) -> tuple[int, int]:
    """(rows, cols) an image of that size occupies in the model input, before padding."""
    if policy == "stretch":
        return (size, size)
    scale = size / max(rows, cols)
    return (max(1, round(rows * scale)), max(1, round(cols * scale)))


def to_model_input(
    image: np.ndarray,
    size: int = MODEL_INPUT_SIZE,
    policy: ResizePolicy = "pad",
    shape: tuple[int, int] | None = None,
    reduction: int = 1,
) -> np.ndarray:
    """Resizes a [0,1] image to the model input, ``(size, size, 1)`` float32.

    Policy ``"pad"`` (the default) keeps the aspect ratio: the longer side
    becomes ``size`` and the shorter is centred and padded with 0 (black, the
    display value of air), so anatomy is never stretched differently for
    different detector shapes. ``"stretch"`` resizes each axis independently
    (what most ImageNet-style code does). Both shrink with Pillow: a box
    average by an integer factor down to within 2x of the target, then its
    antialiased bilinear filter (``reducing_gap=2``): area-like, no overshoot
    outside [0, 1].

    ``shape`` is the (rows, cols) of the full image when ``image`` is a
    reduced-resolution decode of it, each side divided by ``reduction``
    (rounded up), so the output geometry is the full image's to the pixel:
    the resize reads the box of the reduced image that the full one maps to.

    Preprocessing and scoring both call this, so they cannot drift.
    """
    from PIL import Image

    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if policy not in ("pad", "stretch"):
        raise ValueError(f"policy must be 'pad' or 'stretch', not {policy!r}")
    rows, cols = image.shape
    full_rows, full_cols = shape or (rows, cols)
    target = content_shape(full_rows, full_cols, size, policy)
    box = None
    if reduction > 1:
        box = (0.0, 0.0, full_cols / reduction, full_rows / reduction)
    pixels = np.ascontiguousarray(image, dtype=np.float32)
    source = Image.frombuffer("F", (cols, rows), pixels, "raw", "F", 0, 1)
    # reducing_gap: box-average by an integer factor first, then the
    # bilinear filter over the last < 2x: ~3x faster than filtering all the
    # way down, and still antialiased. (decode_model_input does that first
    # box average itself, while mapping the pixels: _box_factor.)
    resized = np.asarray(
        source.resize(
            (target[1], target[0]), Image.Resampling.BILINEAR, box, reducing_gap=_REDUCING_GAP
        ),
        dtype=np.float32,
    )
    out = np.zeros((size, size, 1), dtype=np.float32)
    top, left = (size - target[0]) // 2, (size - target[1]) // 2
    out[top : top + target[0], left : left + target[1], 0] = np.clip(resized, 0.0, 1.0)
    return out
