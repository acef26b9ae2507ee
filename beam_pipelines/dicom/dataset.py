"""A DICOM source parsed into a pydicom Dataset (header and pixel bytes, nothing decoded).

Part 10 files, raw data sets without the Part 10 preamble, and deflated data
sets, inflated within the size their header declares.
"""

from __future__ import annotations

import io
import zlib
from typing import BinaryIO, NamedTuple

import pydicom
from pydicom import filereader
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from beam_pipelines.dicom.errors import DicomRejected
from beam_pipelines.dicom.header import int_value
from beam_pipelines.dicom.options import DEFAULT_OPTIONS, DecodeOptions
from beam_pipelines.dicom.reading import Source, read_source_bytes
from beam_pipelines.privacy import redact


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
    data = read_source_bytes(
        source, options.max_file_bytes, options.read_timeout_s, options.dicomweb
    )
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
    rows, cols = max(0, int_value(head, "Rows")), max(0, int_value(head, "Columns"))
    samples = max(0, int_value(head, "SamplesPerPixel", 1))
    frames = max(1, int_value(head, "NumberOfFrames", 1))
    sample_bytes = -(-max(0, int_value(head, "BitsAllocated")) // 8)
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
