"""The metadata.csv contract: columns, field parsers and the reading rules.

One module owns this contract; the archive writers (synthetic generator,
importer) and both jobs import it.

The file is read as a stream (one line and one row at a time), so its size
does not bound memory. Encoding policy: UTF-8 (with or without a BOM), or
UTF-16 / UTF-32 when a byte-order mark says so. Bytes that are not valid
UTF-8 are never guessed at (a Latin-1/cp1252 export would otherwise change
the paths): the rows holding them are rejected as ``bad_encoding``. See
:func:`iter_metadata` for the structural rules. Opening the file (local or a
URI) is the jobs' business (``beam_pipelines.transforms.rows``).
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterable, Iterator
from typing import IO, Any

PATIENT_ID = "PatientID"
STUDY_ID = "StudyID"
DICOM_PATH = "DicomPath"
VIEW_POSITION = "ViewPosition"
ABNORMAL = "Abnormal"
AGE = "Age"
SEX = "Sex"

#: Columns every metadata.csv has, in the order the writers emit them.
COLUMNS: tuple[str, ...] = (PATIENT_ID, STUDY_ID, DICOM_PATH, VIEW_POSITION, ABNORMAL, AGE, SEX)
#: Columns without which no row can be used (the rest may be blank).
REQUIRED_COLUMNS: tuple[str, ...] = (PATIENT_ID, DICOM_PATH, ABNORMAL)
#: Columns scoring needs: the rest (labels included) may be absent.
SCORING_REQUIRED_COLUMNS: tuple[str, ...] = (DICOM_PATH,)

STUDY_INSTANCE_UID = "StudyInstanceUID"
SERIES_INSTANCE_UID = "SeriesInstanceUID"
SOP_INSTANCE_UID = "SOPInstanceUID"
ACCESSION_NUMBER = "AccessionNumber"
MODALITY = "Modality"
#: Columns ``xray-index`` writes after :data:`COLUMNS`; to the jobs they are
#: extra columns, carried through like any other.
INDEX_COLUMNS: tuple[str, ...] = (
    STUDY_INSTANCE_UID,
    SERIES_INSTANCE_UID,
    SOP_INSTANCE_UID,
    ACCESSION_NUMBER,
    MODALITY,
)
#: Extra columns that identify a patient's images: pseudonymized with the
#: contract's identifiers wherever a job writes them.
IDENTIFYING_EXTRA_COLUMNS: tuple[str, ...] = (
    STUDY_INSTANCE_UID,
    SERIES_INSTANCE_UID,
    SOP_INSTANCE_UID,
    ACCESSION_NUMBER,
)

_TRUE = {"true", "1", "yes", "y", "t", "abnormal"}
_FALSE = {"false", "0", "no", "n", "f", "normal"}
_AGE = re.compile(r"^\s*(\d{1,3})\s*([YMWD]?)\s*$", re.IGNORECASE)
_SEXES = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}


def parse_label(value: object) -> bool | None:
    """Parses an Abnormal cell (true/false/1/0/yes/no, any case).

    Returns:
        True or False, or None when the value is missing or not a boolean.
    """
    if isinstance(value, bool):
        return value
    text = "" if value is None else str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


def parse_age(value: object) -> int | None:
    """Parses an age in years: ``65``, ``65.0`` or a DICOM age string like ``065Y``.

    Months/weeks/days (``006M``) become whole years. Returns None (unknown)
    for blank, negative, implausible (>150) or malformed values.
    """
    if value is None:
        return None
    text = str(value).strip()
    if text.endswith(".0"):
        text = text[:-2]
    match = _AGE.match(text)
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2).upper() or "Y"
    years = {"Y": number, "M": number // 12, "W": number // 52, "D": number // 365}[unit]
    return years if 0 <= years <= 150 else None


def format_dicom_age(years: int) -> str:
    """Formats whole years as a DICOM Age String (``AS``), e.g. 65 -> ``065Y``."""
    if not 0 <= years <= 999:
        raise ValueError(f"age out of range for a DICOM AS value: {years}")
    return f"{years:03d}Y"


def parse_sex(value: object) -> str | None:
    """Parses a Sex cell to ``M``, ``F`` or ``O``; blank or unknown values give None."""
    text = "" if value is None else str(value).strip().upper()
    return _SEXES.get(text)


def format_label(abnormal: bool) -> str:
    """Formats a label the way the writers emit it (``true``/``false``)."""
    return "true" if abnormal else "false"


# --- Reading ------------------------------------------------------------------

#: Undecodable bytes (kept as lone surrogates by ``surrogateescape``) and NUL.
_BAD_TEXT = re.compile("[\x00\udc80-\udcff]")
#: Byte-order marks, longest first (UTF-32 LE starts like UTF-16 LE).
_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
# Keys a row's cells carry when the row is broken before validation. NUL
# cannot be part of a header name (such a header is refused), so they never
# collide with a column.
_PROBLEM = "\x00reason"
_PROBLEM_DETAIL = "\x00detail"
_SAVE_AS_UTF8 = "metadata.csv must be UTF-8 (or UTF-16 with a byte-order mark)"


class MetadataError(ValueError):
    """metadata.csv cannot be used at all (e.g. required columns missing)."""


class _Prepended(io.RawIOBase):
    """A binary stream: some bytes already read, then the rest of ``handle``."""

    def __init__(self, head: bytes, handle: IO[bytes]) -> None:
        super().__init__()
        self._head, self._handle = head, handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._handle.read(len(view))
        view[: len(data)] = data
        return len(data)


def metadata_text(handle: IO[bytes]) -> io.TextIOWrapper:
    """A text stream over metadata.csv bytes, decoded by the documented policy.

    A byte-order mark selects UTF-8, UTF-16 or UTF-32 (and is dropped);
    without one the file is UTF-8. Undecodable UTF-8 bytes are kept as lone
    surrogates (``surrogateescape``) so :func:`iter_metadata` can reject the
    rows holding them instead of changing their text. Line endings are
    returned as they are (``\\n``, ``\\r\\n`` or ``\\r``).
    """
    head = b""
    while len(head) < 4:
        chunk = handle.read(4 - len(head))
        if not chunk:
            break
        head += chunk
    encoding, errors = "utf-8", "surrogateescape"
    for bom, name in _BOMS:
        if head.startswith(bom):
            encoding, head = name, head[len(bom) :]
            # No surrogateescape outside UTF-8: it cannot hold those bytes.
            errors = "surrogateescape" if name == "utf-8" else "strict"
            break
    raw = io.BufferedReader(_Prepended(head, handle), buffer_size=1 << 20)
    return io.TextIOWrapper(raw, encoding=encoding, errors=errors, newline="")


class _Lines:
    """Lines for the csv reader: trailing blanks dropped, each row's lines watched.

    Spaces and tabs before a line ending are not data. Since the last
    :meth:`reset`, ``flagged`` says whether a line held undecodable bytes or
    NUL, and ``quotes`` counts the quote characters read; the csv reader pulls
    exactly the lines of one row at a time, so both are per row.
    """

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = iter(lines)
        self.flagged = False
        self.quotes = 0

    def reset(self) -> None:
        self.flagged = False
        self.quotes = 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        if _BAD_TEXT.search(line):
            self.flagged = True
        self.quotes += line.count('"')
        core = line.rstrip("\r\n")
        return core.rstrip(" \t") + line[len(core) :]


def _printable(text: str) -> str:
    """Text with undecodable bytes shown as ``\\xNN`` (valid, JSON- and coder-safe)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _header(reader: Any, lines: _Lines, required: tuple[str, ...]) -> list[str]:
    """Reads and checks the header; returns the column names (blank = ignored)."""
    try:
        header: list[str] = []
        while not "".join(header).strip():
            header = next(reader)
    except StopIteration:
        raise MetadataError("metadata.csv is empty: it has no header row") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise MetadataError(f"metadata.csv header cannot be read: {exc}") from None
    if lines.flagged:
        shown = [_printable(c) for c in header]
        if any("\x00" in c for c in header):
            raise MetadataError(
                "metadata.csv header contains NUL characters: UTF-16 or UTF-32 without a "
                f"byte-order mark? {_SAVE_AS_UTF8}"
            )
        raise MetadataError(f"metadata.csv header is not valid UTF-8: {shown}; {_SAVE_AS_UTF8}")
    names = [c.strip() for c in header]
    missing = [c for c in required if c not in names]
    if missing:
        raise MetadataError(f"metadata.csv lacks required columns {missing}; it has {names}")
    repeated = sorted({c for c in names if c in COLUMNS and names.count(c) > 1})
    if repeated:
        raise MetadataError(
            f"metadata.csv has columns {repeated} more than once; which one holds the "
            "value is ambiguous"
        )
    # A repeated extra column keeps its data under "Name.1", "Name.2", ...
    # (the first keeps its name; a new name never takes an existing column's).
    taken = set(names)
    first: set[str] = set()
    columns = []
    for name in names:
        unique, k = name, 0
        if name and name in first:  # (unnamed columns are ignored, not renamed)
            while unique in taken:
                k += 1
                unique = f"{name}.{k}"
            taken.add(unique)
        first.add(name)
        columns.append(unique)
    return columns


def _problem(record: list[str], columns: list[str], reason: str, detail: str) -> dict[str, str]:
    """The cells of a row broken before validation: its path (as far as known) and why."""
    at = columns.index(DICOM_PATH) if DICOM_PATH in columns else len(record)
    path = _printable(record[at]).strip() if at < len(record) else ""
    return {DICOM_PATH: path, _PROBLEM: reason, _PROBLEM_DETAIL: detail}


def _encoding_problem(record: list[str], columns: list[str]) -> dict[str, str]:
    where = [
        name or "(unnamed)" for name, v in zip(columns, record, strict=False) if _BAD_TEXT.search(v)
    ]
    if len(record) > len(columns) and any(_BAD_TEXT.search(v) for v in record[len(columns) :]):
        where.append("(cells past the header)")
    if any("\x00" in v for v in record):
        detail = f"NUL character in {where} (UTF-16 without a byte-order mark?)"
    else:
        first = next(ch for v in record for ch in v if "\udc80" <= ch <= "\udcff")
        detail = (
            f"not valid UTF-8 in {where} (byte 0x{ord(first) - 0xDC00:02X}); "
            f"{_SAVE_AS_UTF8}: re-save a Latin-1/cp1252 export as UTF-8"
        )
    return _problem(record, columns, "bad_encoding", detail)


def iter_metadata(
    source: str | Iterable[str], required: tuple[str, ...] = REQUIRED_COLUMNS
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yields (1-based data row, cells) for each data row of metadata.csv.

    ``source`` is the whole text or its lines (e.g. :func:`metadata_text`),
    read one row at a time. Rules:

    * A leading BOM is dropped; quoted commas, quotes and newlines are data;
      ``\\n``, ``\\r\\n`` and ``\\r`` all end lines; spaces and tabs at the end
      of a line and right after a comma are not data.
    * Blank lines and rows of blank cells are not rows (not numbered).
    * Header names are stripped; a column without a name is ignored; a
      repeated extra column is renamed ``Name.1``, ``Name.2``...
    * Rows are never dropped: a row that cannot be used is still yielded and
      :func:`validate_row` rejects it with its reason: ``bad_encoding``
      (bytes that are not UTF-8, or NUL), ``ragged_row`` (fewer cells than
      the header's named columns, or non-blank cells past the header) or
      ``malformed_row`` (a quote left open over several lines).

    Raises:
        MetadataError: when the whole file is unusable: no header, a header
            that is not UTF-8, a required column missing, a contract column
            repeated, or a quoted cell over 128 KiB (a quote never closed:
            the rows after it cannot be told apart).
    """
    if isinstance(source, str):
        source = io.StringIO(source.removeprefix("\ufeff"), newline="")
    lines = _Lines(source)
    reader = csv.reader(lines, skipinitialspace=True)
    columns = _header(reader, lines, required)
    named = max((i + 1 for i, c in enumerate(columns) if c), default=0)
    total = len(columns)
    row = 0
    while True:
        lines.reset()
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:
            raise MetadataError(f"metadata.csv near line {start}: {exc}") from None
        except csv.Error as exc:
            if "field limit" in str(exc):
                raise MetadataError(
                    f"metadata.csv line {start}: {exc}: a quoted field opened there or "
                    "before is probably never closed; fix the quoting (the rows after it "
                    "cannot be told apart)"
                ) from None
            row += 1
            detail = f"line {start}: {exc}"
            yield row, {DICOM_PATH: "", _PROBLEM: "malformed_row", _PROBLEM_DETAIL: detail}
            continue
        if not "".join(record).strip():
            continue
        row += 1
        end = reader.line_num
        if lines.flagged:
            yield row, _encoding_problem(record, columns)
        elif lines.quotes % 2 and end > start:
            # An odd number of quotes over several lines: a quote left open
            # swallowed the lines after it (a quote inside an unquoted cell,
            # like 5" film, is odd too but stays on its line).
            detail = (
                f"lines {start}-{end}: unbalanced quotes; a quoted cell opened on line {start} "
                f"seems never closed and lines up to {end} were read into this row"
            )
            yield row, _problem(record, columns, "malformed_row", detail)
        elif len(record) < named or (len(record) > total and "".join(record[total:]).strip()):
            detail = f"line {start}: {len(record)} cells, the header has {named}"
            yield row, _problem(record, columns, "ragged_row", detail)
        else:
            yield row, {name: value for name, value in zip(columns, record, strict=False) if name}


def check_header(text: IO[str], required: tuple[str, ...] = REQUIRED_COLUMNS) -> None:
    """Reads only the header of metadata.csv text: the check a job makes before any work.

    Raises:
        MetadataError: as :func:`iter_metadata` does for the header.
    """
    lines = _Lines(text)
    _header(csv.reader(lines, skipinitialspace=True), lines, required)


def problem(cells: dict[str, str]) -> tuple[str, str] | None:
    """(reason, detail) of a row :func:`iter_metadata` yielded broken, else None."""
    reason = cells.get(_PROBLEM)
    return (reason, cells[_PROBLEM_DETAIL]) if reason else None


# --- Writing ------------------------------------------------------------------

#: Characters a written cell never holds: NUL and other C0 controls but tab,
#: line feed and carriage return (the reader refuses NUL; the rest is noise).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_cell(value: object) -> str:
    """A header value as a cell: stripped, controls dropped, undecodable bytes escaped.

    Leading and trailing blanks are not data to :func:`iter_metadata`, so they
    are not written either.
    """
    text = "" if value is None else str(value)
    return _printable(_CONTROL.sub("", text)).strip()


def format_row(values: Iterable[str]) -> str:
    """One metadata.csv line (the csv module's quoting, ``\\n`` ending) of cells in order."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(list(values))
    return out.getvalue()
