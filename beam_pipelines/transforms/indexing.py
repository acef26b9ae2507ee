"""The index's stages: sources -> header rows (or rejects), filters, duplicates.

A source lists its inputs on one worker, streaming: every file below a
folder, the files a glob matches, or a DICOMweb server's studies (QIDO-RS,
paged). Workers then read each file's header (one bounded read, never the
pixels) or list each study's instances, and turn them into metadata.csv
cells (:func:`header_cells`). Each input ends as a row, a reject record
(stage ``index``) or a filtered-out count; later copies of an instance
(same SOPInstanceUID) are rejected as ``duplicate_instance``.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam

from beam_pipelines.console import announce_total
from beam_pipelines.contracts import index as ix
from beam_pipelines.contracts import metadata as md
from beam_pipelines.contracts.rejects import internal_error_detail, reject
from beam_pipelines.contracts.rejects import order as reject_order
from beam_pipelines.privacy import install_log_filters
from beam_pipelines.storage.dicomweb import DicomwebSettings, FetchFailed, search
from beam_pipelines.storage.files import is_local, local_path, open_stored
from beam_pipelines.transforms.index_headers import (
    KEYWORDS,
    MAX_HEADER_BYTES,
    IndexRejected,
    read_file_header,
    tags,
)
from beam_pipelines.transforms.labels import labelled_key, unmatched_line
from beam_pipelines.transforms.ordered import WriteCounts, WriteOrdered
from beam_pipelines.transforms.outcomes import KEPT, REJECTED, Progress, tagged

FILTERED = "filtered"


def header_cells(value: Callable[[str], str], dicom_path: str) -> tuple[dict[str, str], str, str]:
    """(metadata.csv cells, BodyPartExamined, StudyDate) from a header's values by keyword.

    Raises:
        IndexRejected: ``missing_uid`` without a SOPInstanceUID or StudyInstanceUID.
    """
    study, sop = value("StudyInstanceUID"), value("SOPInstanceUID")
    if not sop or not study:
        missing = [n for n, v in (("SOPInstanceUID", sop), ("StudyInstanceUID", study)) if not v]
        raise IndexRejected("missing_uid", f"the header has no {' or '.join(missing)}")
    age = md.parse_age(value("PatientAge"))
    cells = {
        md.PATIENT_ID: value("PatientID"),
        # As the scoring job reads a header: a blank StudyID is named by the study's UID.
        md.STUDY_ID: value("StudyID") or study,
        md.DICOM_PATH: dicom_path,
        md.VIEW_POSITION: value("ViewPosition").upper(),
        md.ABNORMAL: "",
        md.AGE: "" if age is None else str(age),
        md.SEX: md.parse_sex(value("PatientSex")) or "",
        md.STUDY_INSTANCE_UID: study,
        md.SERIES_INSTANCE_UID: value("SeriesInstanceUID"),
        md.SOP_INSTANCE_UID: sop,
        md.ACCESSION_NUMBER: value("AccessionNumber"),
        md.MODALITY: value("Modality").upper(),
    }
    return cells, value("BodyPartExamined"), value("StudyDate")


def dataset_value(ds: Any) -> Callable[[str], str]:
    """A read header's values by keyword, as cells."""
    from beam_pipelines.dicom.header import str_value

    return lambda keyword: md.clean_cell(str_value(ds, keyword))


def index_file(path: str, dicom_path: str, limit: int = MAX_HEADER_BYTES) -> Any:
    """(cells, body part, study date) of one file.

    Raises:
        IndexRejected: for a file that gives no row.
    """
    try:
        # A FIFO or device is never opened: reading it could block the worker for good.
        mode = os.stat(local_path(path)).st_mode if is_local(path) else stat.S_IFREG
        if stat.S_ISDIR(mode):
            detail = "a folder that cannot be listed, or a link to a folder (never followed)"
            raise IndexRejected("unreadable", detail)
        if not stat.S_ISREG(mode):
            raise IndexRejected("unreadable", "not a regular file")
        handle = open_stored(path)  # local files: the OS's open, no Beam FileSystems
    except FileNotFoundError:
        raise IndexRejected("unreadable", "the file vanished after it was listed") from None
    except OSError as exc:
        raise IndexRejected("unreadable", f"cannot open the file ({exc.strerror or exc})") from None
    with handle:
        try:
            ds = read_file_header(handle, limit)
        except OSError as exc:
            raise IndexRejected("unreadable", f"read error ({exc.strerror or exc})") from None
    return header_cells(dataset_value(ds), dicom_path)


def _outcome(
    make: Callable[[], tuple[dict[str, str], str, str]], dicom_path: str, filters: ix.Filters
) -> tuple[str, Any]:
    """(KEPT, cells), (FILTERED, filter name) or (REJECTED, record) for one input."""
    try:
        cells, body_part, study_date = make()
    except IndexRejected as exc:
        return REJECTED, reject(None, dicom_path, ix.STAGE, exc.reason, exc.detail)
    except MemoryError:
        raise
    except Exception as exc:
        detail = internal_error_detail(exc, ix.STAGE, None)
        return REJECTED, reject(None, dicom_path, ix.STAGE, "internal_error", detail)
    excluded = filters.excludes(cells, body_part, study_date)
    return (FILTERED, excluded) if excluded else (KEPT, cells)


def relative_path(path: str, root: str) -> str:
    """``path`` relative to ``root`` (a folder or URI prefix), with ``/`` separators."""
    base = root.rstrip("/") + "/"
    if path.startswith(base):
        return path[len(base) :]
    if is_local(path) and is_local(root):
        return os.path.relpath(local_path(path), local_path(root)).replace(os.sep, "/")
    return path


class ReadHeaderFn(beam.DoFn):
    """A listed path (bytes) -> (KEPT, cells) | (FILTERED, filter) | (REJECTED, record)."""

    def __init__(self, root: str, filters: ix.Filters, limit: int = MAX_HEADER_BYTES) -> None:
        self._root, self._filters, self._limit = root, filters, limit

    def setup(self) -> None:
        install_log_filters()  # no header value in pydicom's log lines; workers run no CLI
        self._progress = Progress("headers read")

    def finish_bundle(self) -> None:
        self._progress.flush()

    def process(self, listed: bytes) -> Iterator[tuple[str, Any]]:
        self._progress.tick()
        path = os.fsdecode(listed)
        dicom_path = relative_path(path, self._root)
        problem = unnameable(dicom_path)
        if problem:
            shown = md.clean_cell(dicom_path) or "?"
            yield REJECTED, reject(None, shown, ix.STAGE, "unreadable", problem)
            return
        yield _outcome(lambda: index_file(path, dicom_path, self._limit), dicom_path, self._filters)


def unnameable(dicom_path: str) -> str | None:
    """Why metadata.csv cannot name this path (it would read back as another), or None."""
    try:
        dicom_path.encode("utf-8")
    except UnicodeEncodeError:
        return "the file's name is not valid UTF-8, which metadata.csv cannot hold"
    if dicom_path != dicom_path.strip():
        return "the path starts or ends with a blank, which metadata.csv does not keep"
    return None


# -------------------------------------------------------------------- sources


def glob_root(pattern: str) -> str:
    """The fixed part of a glob: before its first wildcard, up to the last ``/``."""
    cut = min((i for i, ch in enumerate(pattern) if ch in "*?["), default=len(pattern))
    return pattern[: pattern.rfind("/", 0, cut) + 1].rstrip("/") or "/"


def walk_files(root: str) -> Iterator[str]:
    """Every entry below ``root`` but the folders it descends into, recursively.

    Links to folders are not followed (no loops) and a folder that cannot be
    listed is yielded itself: both become rejects, never a silent gap.
    """
    stack = [local_path(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                found = list(entries)
        except OSError:
            if folder == local_path(root):
                raise
            yield folder
            continue
        for entry in found:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            else:
                yield entry.path


class ListFilesFn(beam.DoFn):
    """A folder or a glob -> every file in it; the count becomes the progress bar's total.

    Paths travel as bytes (``os.fsencode``): a name that is not UTF-8 must
    reach the reader, which rejects it, instead of failing Beam's string coder.
    """

    def __init__(self, folder: bool) -> None:
        self._folder = folder

    def process(self, location: str) -> Iterator[bytes]:
        listed = 0
        if self._folder and is_local(location):
            paths: Iterable[str] = walk_files(location)
        else:
            from apache_beam.io.filesystems import FileSystems

            # A bucket "folder" is every object below its prefix.
            pattern = f"{glob.escape(location.rstrip('/'))}/**" if self._folder else location
            paths = (found.path for found in FileSystems.match([pattern])[0].metadata_list)
        for path in paths:
            listed += 1
            yield os.fsencode(path)
        announce_total(listed)


#: QIDO-RS tags (hex) by keyword, for the instance listing's includefield.
_QIDO_TAGS = {keyword: f"{int(tag):08X}" for keyword, tag in zip(KEYWORDS, tags(), strict=True)}


#: Study UIDs one study search names: a URL with hundreds of them is refused
#: (Orthanc answered HTTP 400 to 235), 50 keep it near 3 kB.
STUDY_UIDS_PER_SEARCH = 50


def qido_study_params(filters: ix.Filters) -> list[dict[str, str | list[str]]]:
    """The study searches' server-side filters (what QIDO-RS can match at study level).

    One search, or one per :data:`STUDY_UIDS_PER_SEARCH` study UIDs when they are filtered.
    """
    params: dict[str, str | list[str]] = {"includefield": "0020000D"}
    if filters.modalities:
        params["ModalitiesInStudy"] = ",".join(filters.modalities)
    if filters.date_range:
        params["StudyDate"] = filters.date_range
    uids = filters.study_uids
    if not uids:
        return [params]
    return [
        {**params, "StudyInstanceUID": ",".join(uids[start : start + STUDY_UIDS_PER_SEARCH])}
        for start in range(0, len(uids), STUDY_UIDS_PER_SEARCH)
    ]


def qido_value(found: dict[str, Any]) -> Callable[[str], str]:
    """A QIDO-RS JSON object's first value by keyword, as a cell ("" when absent)."""

    def value(keyword: str) -> str:
        values = (found.get(_QIDO_TAGS[keyword]) or {}).get("Value") or [""]
        first = values[0]
        if isinstance(first, dict):  # a person name
            first = first.get("Alphabetic", "")
        return md.clean_cell(first)

    return value


class ListStudiesFn(beam.DoFn):
    """The server's studies (QIDO-RS, paged, filtered on the server where it can)."""

    def __init__(self, settings: DicomwebSettings, filters: ix.Filters) -> None:
        self._settings, self._filters = settings, filters

    def process(self, _: Any) -> Iterator[str]:
        install_log_filters()
        studies = 0
        for params in qido_study_params(self._filters):
            for found in search(self._settings, "studies", params):
                studies += 1
                yield qido_value(found)("StudyInstanceUID")  # "" becomes a reject, not a gap
        announce_total(studies)


#: Studies a worker lists at once (its requests overlap, up to the settings' connections).
STUDIES_PER_BATCH = 32


class ListInstancesFn(beam.DoFn):
    """A batch of studies -> their instances' outcomes, as :class:`ReadHeaderFn` gives a file's.

    A study's instances are listed by one QIDO-RS search; the batch's searches
    run in ``max_connections`` threads, since each waits mostly on the server.
    """

    def __init__(self, settings: DicomwebSettings, filters: ix.Filters) -> None:
        self._settings, self._filters = settings, filters

    def setup(self) -> None:
        install_log_filters()
        self._progress = Progress("studies listed")

    def finish_bundle(self) -> None:
        self._progress.flush()

    def process(self, studies: list[str]) -> Iterator[tuple[str, Any]]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self._settings.max_connections) as pool:
            for outcomes in pool.map(self._study, studies):
                self._progress.tick()
                yield from outcomes

    def _study(self, study: str) -> list[tuple[str, Any]]:
        settings = self._settings
        where = f"dicomweb+{settings.url}/studies/{study}"
        if not study:
            detail = "the server listed a study without a StudyInstanceUID"
            return [(REJECTED, reject(None, where, ix.STAGE, "missing_uid", detail))]
        # Every instance of the study, filtered here: so the filtered-out ones are counted.
        params: dict[str, str | list[str]] = {"includefield": sorted(_QIDO_TAGS.values())}
        try:
            found = list(search(settings, f"studies/{study}/instances", params))
        except FetchFailed as exc:
            detail = f"listing a study: {exc}"
            return [(REJECTED, reject(None, where, ix.STAGE, "fetch_failed", detail))]
        return [
            _outcome(
                functools.partial(_instance_cells, settings, study, qido_value(instance)),
                where,
                self._filters,
            )
            for instance in found
        ]


def _instance_cells(
    settings: DicomwebSettings, study: str, value: Callable[[str], str]
) -> tuple[dict[str, str], str, str]:
    def known(keyword: str) -> str:
        found = value(keyword)
        return found or (study if keyword == "StudyInstanceUID" else "")

    sop, series = known("SOPInstanceUID"), known("SeriesInstanceUID")
    return header_cells(known, settings.instance_path(study, series, sop))


# ----------------------------------------------------------------- duplicates


class KeepFirstInstance(beam.PTransform):
    """Rows -> (KEPT, row) for the first path of each SOPInstanceUID, (REJECTED, record) else."""

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return (
            rows
            | "KeyByInstance" >> beam.Map(lambda cells: (cells[md.SOP_INSTANCE_UID], cells))
            | "GroupByInstance" >> beam.GroupByKey()
            | "KeepFirst" >> beam.FlatMap(_keep_first)
        )


def _keep_first(element: tuple[str, Iterable[dict[str, str]]]) -> Iterator[tuple[str, Any]]:
    _, copies = element
    ordered = sorted(copies, key=lambda cells: cells[md.DICOM_PATH])
    kept = ordered[0][md.DICOM_PATH]
    yield KEPT, ordered[0]
    for copy in ordered[1:]:
        detail = f"the same SOPInstanceUID as {kept}, which is kept"
        yield REJECTED, reject(None, copy[md.DICOM_PATH], ix.STAGE, "duplicate_instance", detail)


# ----------------------------------------------------------------- composites


class ReadArchive(beam.PTransform):
    """PBegin -> every input's outcome: (KEPT, cells), (FILTERED, filter) or (REJECTED, record).

    ``folder`` (every file below it), ``glob`` (the files it matches; DicomPath
    relative to ``root``, its fixed prefix) or ``settings`` (a DICOMweb server).
    """

    def __init__(
        self,
        filters: ix.Filters,
        *,
        folder: str | None = None,
        glob: str | None = None,
        root: str = "",
        settings: DicomwebSettings | None = None,
    ) -> None:
        super().__init__()
        if sum(x is not None for x in (folder, glob, settings)) != 1:
            raise ValueError("exactly one of folder, glob, settings")
        self._filters, self._folder, self._glob = filters, folder, glob
        self._root, self._settings = root, settings

    def expand(self, pipeline: beam.pvalue.PBegin) -> beam.PCollection:
        if self._settings is not None:
            return (
                pipeline
                | "Server" >> beam.Create([None])
                | "ListStudies" >> beam.ParDo(ListStudiesFn(self._settings, self._filters))
                | "SpreadStudies" >> beam.Reshuffle()
                | "BatchStudies" >> beam.BatchElements(1, STUDIES_PER_BATCH)
                | "ListInstances" >> beam.ParDo(ListInstancesFn(self._settings, self._filters))
            )
        location = self._folder if self._folder is not None else self._glob
        return (
            pipeline
            | "Location" >> beam.Create([location])
            | "ListFiles" >> beam.ParDo(ListFilesFn(self._folder is not None))
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadHeaders" >> beam.ParDo(ReadHeaderFn(self._root, self._filters))
        )


class IndexedRows(beam.PTransform):
    """Outcomes -> (rows of distinct instances, reject records, names of the failed filters)."""

    def expand(
        self, outcomes: beam.PCollection
    ) -> tuple[beam.PCollection, beam.PCollection, beam.PCollection]:
        rows = outcomes | "Rows" >> beam.FlatMap(tagged(KEPT))
        unread = outcomes | "Unread" >> beam.FlatMap(tagged(REJECTED))
        filtered = outcomes | "Filtered" >> beam.FlatMap(tagged(FILTERED))
        kept = rows | "Duplicates" >> KeepFirstInstance()
        unique = kept | "Unique" >> beam.FlatMap(tagged(KEPT))
        copies = kept | "Copies" >> beam.FlatMap(tagged(REJECTED))
        rejects = (unread, copies) | "AllRejects" >> beam.Flatten()
        return unique, rejects, filtered


INDEX_COLUMNS: tuple[str, ...] = (*md.COLUMNS, *md.INDEX_COLUMNS)


def metadata_line(cells: dict[str, str]) -> tuple[tuple[str, str, str], str]:
    """(order key, metadata.csv line): rows by study, series, instance UID."""
    key = tuple(cells[c] for c in md.INDEX_COLUMNS[:3])
    return key, md.format_row(cells[c] for c in INDEX_COLUMNS)  # type: ignore[return-value]


def reject_line(record: dict[str, Any]) -> tuple[Any, str]:
    """(order key, rejects.jsonl line): the rejects contract's order (by path, no rows)."""
    return reject_order(record), json.dumps(record, sort_keys=True) + "\n"


class WriteIndex(beam.PTransform):
    """Rows, rejects, filter names, unmatched labels -> the index's files as sorted parts.

    Parts of ``metadata.csv``, ``rejects/rejects.jsonl`` and
    ``unmatched_labels.csv`` below ``out`` (the job concatenates them), and
    ``counts`` (a JSON file of the counts summary.json is built from).
    """

    def __init__(self, out: str, counts: str, labelled: bool) -> None:
        super().__init__()
        self._out, self._counts, self._labelled = out, counts, labelled

    def expand(self, inputs: tuple[beam.PCollection, ...]) -> beam.PCollection:
        rows, rejects, filtered, unmatched = inputs
        out = self._out
        _ = (
            rows
            | "MetadataLines" >> beam.Map(metadata_line)
            | "WriteMetadata" >> WriteOrdered(f"{out}/{ix.METADATA_FILE}")
        )
        _ = (
            rejects
            | "RejectLines" >> beam.Map(reject_line)
            | "WriteRejects" >> WriteOrdered(f"{out}/{ix.REJECTS_FILE}")
        )
        _ = (
            unmatched
            | "UnmatchedLines" >> beam.Map(unmatched_line)
            | "WriteUnmatched" >> WriteOrdered(f"{out}/{ix.UNMATCHED_FILE}")
        )
        labelled = self._labelled
        names = (
            rows
            | "RowCounts"
            >> beam.FlatMap(lambda r: [ix.INDEXED, labelled_key(r)] if labelled else [ix.INDEXED]),
            rejects | "RejectCounts" >> beam.Map(lambda r: ix.rejected_key(r["reason"])),
            filtered | "FilterCounts" >> beam.Map(ix.filtered_key),
            unmatched | "UnmatchedCounts" >> beam.Map(lambda u: ix.unmatched_key(u[2])),
        ) | "AllCounts" >> beam.Flatten()
        return names | "WriteCounts" >> WriteCounts(self._counts)
