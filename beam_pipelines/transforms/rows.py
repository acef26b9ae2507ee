"""Reading and validating metadata.csv rows: the first stages of preprocessing and scoring.

A row becomes either a :class:`ValidRow` or a reject record; it is never
dropped. Paths are resolved against the archive root and may not escape it,
lexically or through a symlink; absolute URIs are read only when their
scheme is allowed.

The file is read as a stream (one line and one row at a time), so its size
does not bound memory. Encoding policy: UTF-8 (with or without a BOM), or
UTF-16 / UTF-32 when a byte-order mark says so. Bytes that are not valid
UTF-8 are never guessed at (a Latin-1/cp1252 export would otherwise change
the paths): the rows holding them are rejected as ``bad_encoding``. See
:func:`iter_metadata` for the structural rules.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import functools
import io
import os
import posixpath
import re
from collections.abc import Collection, Iterable, Iterator
from typing import IO, Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipelines.contracts import metadata as md
from beam_pipelines.transforms.outcomes import KEPT, REJECTED

#: Columns scoring needs: the rest (labels included) may be absent.
SCORING_REQUIRED_COLUMNS: tuple[str, ...] = (md.DICOM_PATH,)

#: Reject reasons of the row-reading and validation stage (stage ``validate``).
VALIDATE_REASONS: tuple[str, ...] = (
    "bad_encoding",
    "malformed_row",
    "ragged_row",
    "missing_path",
    "missing_patient_id",
    "bad_label",
    "scheme_not_allowed",
    "path_escapes_root",
    "duplicate_path",
)

_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
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


@dataclasses.dataclass(frozen=True)
class ValidRow:
    """A metadata row that passed validation; ``row`` is its 1-based data row."""

    row: int
    patient_id: str
    study_id: str
    dicom_path: str
    resolved_path: str
    view_position: str
    abnormal: bool | None
    age: int | None
    sex: str | None
    extra: dict[str, str]


def reject(
    row: int | None, dicom_path: str, stage: str, reason: str, detail: str
) -> dict[str, Any]:
    """Builds one reject record (the rejects/*.jsonl contract)."""
    return {
        "row": row,
        "dicom_path": dicom_path,
        "stage": stage,
        "reason": reason,
        "detail": detail,
    }


# --- Reading ------------------------------------------------------------------


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
    repeated = sorted({c for c in names if c in md.COLUMNS and names.count(c) > 1})
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
    at = columns.index(md.DICOM_PATH) if md.DICOM_PATH in columns else len(record)
    path = _printable(record[at]).strip() if at < len(record) else ""
    return {md.DICOM_PATH: path, _PROBLEM: reason, _PROBLEM_DETAIL: detail}


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
    source: str | Iterable[str], required: tuple[str, ...] = md.REQUIRED_COLUMNS
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
            yield row, {md.DICOM_PATH: "", _PROBLEM: "malformed_row", _PROBLEM_DETAIL: detail}
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


@contextlib.contextmanager
def open_metadata(path: str) -> Iterator[IO[str]]:
    """metadata.csv (path or URI, compressed or not) as text, by the encoding policy."""
    with FileSystems.open(path) as handle:
        yield metadata_text(handle)


def read_metadata(
    path: str, required: tuple[str, ...] = md.REQUIRED_COLUMNS
) -> Iterator[tuple[int, dict[str, str]]]:
    """:func:`iter_metadata` streamed from a file: one row in memory at a time."""
    with open_metadata(path) as text:
        yield from iter_metadata(text, required)


def check_metadata(path: str, required: tuple[str, ...] = md.REQUIRED_COLUMNS) -> None:
    """Reads only the header of metadata.csv: the check a job makes before any work.

    Raises:
        MetadataError: as :func:`iter_metadata` does for the header.
    """
    with open_metadata(path) as text:
        lines = _Lines(text)
        _header(csv.reader(lines, skipinitialspace=True), lines, required)


# --- Paths --------------------------------------------------------------------


def archive_root_for(metadata: str, given: str | None) -> str:
    """The folder DicomPath is relative to: ``--archive_root`` or the CSV's folder."""
    root = given or (metadata.rsplit("/", 1)[0] if "/" in metadata else ".")
    return root if "://" in root else posixpath.abspath(root)


def uri_scheme(path: str) -> str | None:
    """The scheme of a URI (``gs://…`` -> ``gs``, lower case); None for a local path."""
    match = _URI.match(path)
    return match.group(1).lower() if match else None


def parse_schemes(text: str | None) -> frozenset[str]:
    """``gs,s3`` (``gs://`` also accepted) -> {gs, s3}.

    Raises:
        ValueError: for a name that cannot be a URI scheme.
    """
    schemes = set()
    for item in (text or "").split(","):
        name = item.strip().lower().removesuffix("://").removesuffix(":")
        if not name:
            continue
        if not _SCHEME.match(name):
            raise ValueError(f"not a URI scheme: {item.strip()!r}")
        schemes.add(name)
    return frozenset(schemes)


def allowed_schemes_for(locations: Iterable[str], extra: Iterable[str] = ()) -> frozenset[str]:
    """Schemes a DicomPath URI may use: those of the given locations, plus ``extra``.

    The locations are the ones the user chose on the command line (archive
    root, metadata.csv); local paths need no scheme and are always allowed.
    """
    own = {uri_scheme(location) for location in locations}
    return frozenset({s for s in own if s} | set(extra))


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


@functools.lru_cache(maxsize=4096)
def _real_dir(path: str) -> str:
    """realpath of a folder, cached: the rows of a folder share it."""
    return os.path.realpath(path)


def _real_path(path: str) -> str:
    """realpath of a file: its folder's (cached), then the file itself if a symlink."""
    parent, name = posixpath.split(path)
    real = posixpath.join(_real_dir(parent), name) if name else _real_dir(path)
    return os.path.realpath(real) if os.path.islink(real) else real


def resolve_path(archive_root: str, dicom_path: str) -> str | None:
    """Resolves a DicomPath against the archive root; None if it escapes the root.

    URIs (``gs://…``) are taken as they are (their scheme is checked by
    :func:`validate_row`). Relative paths are normalized lexically; ``..``
    that climbs out of the root, and absolute paths outside it, escape. Under
    a local root, a path whose real location (symlinks followed, in the file
    or in any folder on the way) is outside the root's real location escapes
    too; symlinks that stay inside the root are fine. The path returned is
    the lexical one.
    """
    if _URI.match(dicom_path):
        return dicom_path
    root = archive_root.rstrip("/") or "/"
    if _URI.match(root):
        joined = posixpath.normpath(posixpath.join(root.split("://", 1)[1], dicom_path))
        scheme = root.split("://", 1)[0]
        base = posixpath.normpath(root.split("://", 1)[1])
        if not (joined == base or joined.startswith(base + "/")):
            return None
        return f"{scheme}://{joined}"
    joined = posixpath.normpath(posixpath.join(root, dicom_path))
    base = posixpath.normpath(root)
    if not _inside(joined, base):
        return None
    try:
        if not _inside(_real_path(joined), _real_dir(base)):
            return None
    except (OSError, ValueError):  # e.g. a symlink loop, an embedded NUL
        return None
    return joined


def validate_row(
    row: int,
    cells: dict[str, str],
    archive_root: str,
    scoring: bool = False,
    allowed_schemes: Collection[str] | None = None,
) -> ValidRow | dict[str, Any]:
    """Validates one row; returns a ValidRow or a reject record.

    With ``scoring=True`` (scoring archives that may be unlabelled) a blank
    Abnormal cell gives ``abnormal=None`` and a blank PatientID is left for
    the DICOM header to fill; a non-blank invalid label is still rejected.
    A DicomPath URI is read only if its scheme is in ``allowed_schemes``
    (default: the archive root's scheme, if it has one); others are rejected
    as ``scheme_not_allowed``.
    """
    problem = cells.get(_PROBLEM)
    if problem:
        return reject(
            row, cells.get(md.DICOM_PATH, ""), "validate", problem, cells[_PROBLEM_DETAIL]
        )
    dicom_path = (cells.get(md.DICOM_PATH) or "").strip()
    patient_id = (cells.get(md.PATIENT_ID) or "").strip()
    if not dicom_path:
        return reject(row, dicom_path, "validate", "missing_path", "DicomPath is blank")
    if not patient_id and not scoring:
        return reject(row, dicom_path, "validate", "missing_patient_id", "PatientID is blank")
    label = md.parse_label(cells.get(md.ABNORMAL))
    if label is None and (not scoring or (cells.get(md.ABNORMAL) or "").strip()):
        return reject(
            row, dicom_path, "validate", "bad_label", "Abnormal is not true/false/1/0/yes/no"
        )
    scheme = uri_scheme(dicom_path)
    if scheme is not None:
        allowed = (
            allowed_schemes if allowed_schemes is not None else allowed_schemes_for([archive_root])
        )
        if scheme not in allowed:
            shown = ", ".join(sorted(allowed)) or "none: local paths only"
            return reject(
                row,
                dicom_path,
                "validate",
                "scheme_not_allowed",
                f"{scheme}:// is not an allowed scheme (allowed: {shown}); "
                "--allowed_schemes adds schemes",
            )
    resolved = resolve_path(archive_root, dicom_path)
    if resolved is None:
        return reject(
            row,
            dicom_path,
            "validate",
            "path_escapes_root",
            "DicomPath leaves the archive root (directly or through a symlink)",
        )
    extra = {k: v for k, v in cells.items() if k not in md.COLUMNS}
    return ValidRow(
        row=row,
        patient_id=patient_id,
        study_id=(cells.get(md.STUDY_ID) or "").strip(),
        dicom_path=dicom_path,
        resolved_path=resolved,
        view_position=(cells.get(md.VIEW_POSITION) or "").strip().upper(),
        abnormal=label,
        age=md.parse_age(cells.get(md.AGE)),
        sex=md.parse_sex(cells.get(md.SEX)),
        extra=extra,
    )


# --- Beam stages --------------------------------------------------------------


class ReadMetadataFn(beam.DoFn):
    """Reads metadata.csv on one worker, streaming, and emits (row, cells).

    One sequential read keeps row numbers exact and handles quoted newlines;
    only one row is held at a time. 10^6 rows take seconds
    (``benchmarks/metadata_scale.py``), and a Reshuffle spreads the rest.
    """

    def __init__(self, required: tuple[str, ...] = md.REQUIRED_COLUMNS) -> None:
        self._required = required

    def process(self, path: str) -> Iterator[tuple[int, dict[str, str]]]:
        yield from read_metadata(path, self._required)


class ValidateRowFn(beam.DoFn):
    """Turns raw cells into (KEPT, ValidRow) or (REJECTED, reject record)."""

    def __init__(
        self,
        archive_root: str,
        scoring: bool = False,
        allowed_schemes: Collection[str] | None = None,
    ) -> None:
        self._archive_root = archive_root
        self._scoring = scoring
        self._allowed_schemes = None if allowed_schemes is None else frozenset(allowed_schemes)

    def process(self, element: tuple[int, dict[str, str]]) -> Iterator[Any]:
        row, cells = element
        result = validate_row(row, cells, self._archive_root, self._scoring, self._allowed_schemes)
        if isinstance(result, ValidRow):
            yield KEPT, result
        else:
            Metrics.counter(self.__class__, f"rejected_{result['reason']}").inc()
            yield REJECTED, result


def file_identity(resolved: str) -> str:
    """The file a resolved path names: symlinks followed for local paths, URIs as given.

    Two DicomPaths that reach one file through symlinks (a link farm by date
    beside one by patient) are one image: counted twice it could even land
    in two splits. Hard links are separate files here.
    """
    if _URI.match(resolved):
        return resolved
    try:
        return _real_path(resolved)
    except (OSError, ValueError):
        return resolved


class RejectDuplicatePaths(beam.PTransform):
    """Keeps the first row of each file (:func:`file_identity`); later rows are rejected."""

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return (
            rows
            | "KeyByPath" >> beam.Map(lambda r: (file_identity(r.resolved_path), r))
            | "GroupByPath" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(_KeepFirstFn())
        )


class _KeepFirstFn(beam.DoFn):
    def process(self, element: tuple[str, Iterable[ValidRow]]) -> Iterator[Any]:
        _, group = element
        ordered = sorted(group, key=lambda r: r.row)
        yield KEPT, ordered[0]
        for duplicate in ordered[1:]:
            Metrics.counter(self.__class__, "rejected_duplicate_path").inc()
            yield (
                REJECTED,
                reject(
                    duplicate.row,
                    duplicate.dicom_path,
                    "validate",
                    "duplicate_path",
                    f"same file as row {ordered[0].row}",
                ),
            )
