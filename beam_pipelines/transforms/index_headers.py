"""A DICOM file's header as the index reads it: the elements it needs, one bounded read.

Parsing stops at the first element after the last one the index needs, so
pixels are never read, and no read goes past :data:`MAX_HEADER_BYTES`; a
deflated data set is inflated only that far. No Beam: plain file objects.
"""

from __future__ import annotations

import io
import zlib
from typing import Any, BinaryIO

#: The header elements the index reads (and the only ones parsed).
KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "SOPInstanceUID",
    "StudyDate",
    "AccessionNumber",
    "Modality",
    "PatientID",
    "PatientSex",
    "PatientAge",
    "BodyPartExamined",
    "ViewPosition",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyID",
)
#: Longest header (bytes from the file's start) the index reads before giving up.
MAX_HEADER_BYTES = 16 << 20


class IndexRejected(Exception):
    """An input that gives no row: a reason of :data:`contracts.index.REASONS` and a detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class _WholeRest(Exception):
    """pydicom asked for the rest of the file: a deflated data set starts at ``position``."""

    def __init__(self, position: int) -> None:
        super().__init__(position)
        self.position = position


class _Bounded(io.RawIOBase):
    """A file as pydicom reads it, within ``limit`` bytes; notes whether it ended early.

    ``short``: a read got fewer bytes than asked (but for a clean end, where
    the next element's 8-byte tag would start), or pydicom skipped an
    element's value past the end of the file.
    """

    def __init__(self, handle: BinaryIO, limit: int) -> None:
        super().__init__()
        self._handle, self._limit = handle, limit
        start = handle.tell()
        self._size = handle.seek(0, io.SEEK_END)
        handle.seek(start)
        self.short = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        position = self._handle.tell()
        if size is None or size < 0:
            raise _WholeRest(position)
        if position + size > self._limit:
            raise IndexRejected("too_large", f"the header is longer than {self._limit} bytes")
        data = self._handle.read(size)
        if len(data) < size and (data or size != 8 or position != self._size):
            self.short = True
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self._handle.seek(offset, whence)
        if position > self._size:
            self.short = True
        return position

    def tell(self) -> int:
        return self._handle.tell()


def tags() -> list[Any]:
    """The tags of :data:`KEYWORDS`."""
    from pydicom.tag import Tag

    return [Tag(keyword) for keyword in KEYWORDS]


def read_file_header(handle: BinaryIO, limit: int = MAX_HEADER_BYTES) -> Any:
    """The elements of :data:`KEYWORDS` from an open DICOM file (a pydicom Dataset).

    Raises:
        IndexRejected: ``not_dicom``, ``truncated``, ``too_large`` or ``unreadable``.
        OSError: the file could not be read.
    """
    bounded = _Bounded(handle, limit)
    try:
        return _parse(handle, bounded, limit)
    except (IndexRejected, OSError, MemoryError):
        raise
    except Exception as exc:  # pydicom's many ways of refusing a header
        if bounded.short or isinstance(exc, EOFError | zlib.error):
            detail = f"the file ends inside its header ({type(exc).__name__})"
            raise IndexRejected("truncated", detail) from None
        detail = f"the header cannot be parsed ({type(exc).__name__})"
        raise IndexRejected("unreadable", detail) from None


def _parse(handle: BinaryIO, bounded: _Bounded, limit: int) -> Any:
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_dataset, read_partial

    wanted = tags()
    last = max(wanted)
    reached: list[bool] = []
    ds: Any

    def stop(tag: Any, vr: str | None, length: int) -> bool:
        if tag > last:  # every element needed is behind: the rest is never read
            reached.append(True)
        return bool(reached)

    try:
        try:
            ds = read_partial(bounded, stop_when=stop, specific_tags=wanted)  # type: ignore[arg-type]
        except InvalidDicomError:
            handle.seek(0)
            head = handle.read(8)
            # A raw data set (no preamble or DICM prefix) is DICOM to the decoder too.
            if len(head) < 8 or head[:2] not in (b"\x08\x00", b"\x02\x00"):
                raise IndexRejected("not_dicom", "no DICOM header (no DICM prefix)") from None
            handle.seek(0)
            ds = read_partial(
                bounded,  # type: ignore[arg-type]
                stop_when=stop,
                specific_tags=wanted,
                force=True,
            )
    except _WholeRest as rest:  # pydicom would inflate the whole data set: only its head here
        handle.seek(rest.position)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        data = inflater.decompress(handle.read(min(limit, 1 << 20)), limit)
        ds = read_dataset(io.BytesIO(data), False, True, stop_when=stop, specific_tags=wanted)
    if not reached:
        # Every image (every object with content) has elements after StudyID:
        # a file that ends before them was cut, perhaps right between two elements.
        raise IndexRejected("truncated", "the file ends inside its header")
    return ds
