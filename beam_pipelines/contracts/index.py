"""The index's own outputs (``xray-index``): summary.json, unmatched_labels.csv, its rejects.

The index writes a folder: ``metadata.csv`` (the metadata contract, its
:data:`~beam_pipelines.contracts.metadata.COLUMNS` then
:data:`~beam_pipelines.contracts.metadata.INDEX_COLUMNS`), ``summary.json``
(:func:`build_summary`), ``unmatched_labels.csv`` (:data:`UNMATCHED_COLUMNS`)
and ``rejects/rejects.jsonl`` (the rejects contract, stage ``index``, no row).
The filters the index applies (:class:`Filters`) are parsed and matched here
too, so what the summary records and what was applied are one thing.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from beam_pipelines.contracts import metadata as md

METADATA_FILE = "metadata.csv"
SUMMARY_FILE = "summary.json"
UNMATCHED_FILE = "unmatched_labels.csv"
REJECTS_FILE = "rejects/rejects.jsonl"
SCHEMA_VERSION = 1

#: The rejects' stage.
STAGE = "index"
#: Why an input did not become a row (stable codes).
REASONS: tuple[str, ...] = (
    "not_dicom",  # no DICOM header (no "DICM" prefix, not a raw data set)
    "unreadable",  # not a regular file, an I/O error, a header the parser refuses
    "truncated",  # the file ends inside its header
    "too_large",  # a header longer than the bound the index reads
    "missing_uid",  # no SOPInstanceUID or no StudyInstanceUID
    "duplicate_instance",  # a SOPInstanceUID already indexed from another path
    "fetch_failed",  # a DICOMweb search that failed for good
    "internal_error",  # an unexpected error on one input (a bug, not the file)
)

#: Columns the label file may be joined on (they are metadata.csv columns of the index).
LABEL_KEYS: tuple[str, ...] = (
    md.STUDY_INSTANCE_UID,
    md.ACCESSION_NUMBER,
    md.SOP_INSTANCE_UID,
    md.PATIENT_ID,
)
#: unmatched_labels.csv: the label file's 1-based data row, its key value, why.
UNMATCHED_COLUMNS: tuple[str, ...] = ("row", "key", "reason")
#: Why a labels row gave no image its label.
UNMATCHED_REASONS: tuple[str, ...] = (
    "no_image",  # no indexed image has this key
    "bad_value",  # the label is not true/false/1/0/yes/no
    "conflicting_value",  # the key is given again with another label (every such row is listed)
    "blank_key",  # the key cell is blank
    "unreadable_row",  # a row the labels CSV reader rejected (encoding, quoting, cells)
)

_DATE = re.compile(r"^\d{8}$")


def _items(text: str | None, upper: bool = True) -> tuple[str, ...]:
    values = (v.strip() for v in (text or "").split(","))
    return tuple(sorted({v.upper() if upper else v for v in values if v}))


@dataclasses.dataclass(frozen=True)
class Filters:
    """Which instances the index keeps: every given filter must match (empty: no filter).

    Attributes:
        modalities: Modality values (``CR``, ``DX``), upper case.
        body_parts: BodyPartExamined values (``CHEST``), upper case.
        date_from: first StudyDate kept, ``YYYYMMDD``, or "" (open).
        date_to: last StudyDate kept, or "" (open).
        study_uids: StudyInstanceUIDs.
    """

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    date_from: str = ""
    date_to: str = ""
    study_uids: tuple[str, ...] = ()

    @classmethod
    def parse(
        cls,
        modality: str | None = None,
        body_part: str | None = None,
        study_date: str | None = None,
        study_uid: str | None = None,
    ) -> Filters:
        """Filters from the flags' text.

        Raises:
            ValueError: naming the flag, for a date range that is not
                ``YYYYMMDD-YYYYMMDD`` (either end may be left open), ``YYYYMMDD``,
                or that ends before it starts.
        """
        date_from = date_to = ""
        if study_date and study_date.strip():
            text = study_date.strip()
            start, dash, end = text.partition("-")
            date_from, date_to = start.strip(), (end.strip() if dash else start.strip())
            if not all(_DATE.match(d) for d in (date_from, date_to) if d) or not (
                date_from or date_to
            ):
                raise ValueError(
                    f"--study_date {text!r}: use YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- "
                    "or -YYYYMMDD"
                )
            if date_from and date_to and date_from > date_to:
                raise ValueError(f"--study_date {text!r}: the range ends before it starts")
        return cls(
            modalities=_items(modality),
            body_parts=_items(body_part),
            date_from=date_from,
            date_to=date_to,
            study_uids=_items(study_uid, upper=False),
        )

    @property
    def date_range(self) -> str:
        """The DICOM range (``A-B``, ``A-``, ``-B``), or "" without a date filter."""
        if not (self.date_from or self.date_to):
            return ""
        return f"{self.date_from}-{self.date_to}"

    def excludes(self, cells: dict[str, str], body_part: str, study_date: str) -> str | None:
        """The filter an instance fails (``modality``, ``body_part``, ``study_date``,
        ``study_uid``), or None when it is kept; ``cells`` are its index columns.

        An instance whose header lacks a filtered value fails that filter.
        """
        if self.study_uids and cells.get(md.STUDY_INSTANCE_UID, "") not in self.study_uids:
            return "study_uid"
        if self.modalities and cells.get(md.MODALITY, "").upper() not in self.modalities:
            return "modality"
        if self.body_parts and body_part.strip().upper() not in self.body_parts:
            return "body_part"
        if self.date_from or self.date_to:
            date = study_date.strip()
            if not _DATE.match(date):
                return "study_date"
            if (self.date_from and date < self.date_from) or (self.date_to and date > self.date_to):
                return "study_date"
        return None

    def as_dict(self) -> dict[str, Any]:
        """As summary.json records them."""
        return {
            "modality": list(self.modalities),
            "body_part": list(self.body_parts),
            "study_date": self.date_range,
            "study_uid": len(self.study_uids),  # how many, not which: UIDs are PHI
        }


#: Names of the counts the pipeline gathers (summary.json's numbers come from them).
INDEXED = "indexed"
UNLABELLED = "unlabelled"
LABELLED = "labelled"


def filtered_key(name: str) -> str:
    return f"filtered/{name}"


def rejected_key(reason: str) -> str:
    return f"rejected/{reason}"


def unmatched_key(reason: str) -> str:
    return f"unmatched/{reason}"


def build_summary(
    counts: dict[str, int],
    source: dict[str, Any],
    filters: Filters,
    labels: dict[str, Any] | None,
) -> dict[str, Any]:
    """summary.json from the run's counts.

    Keys: ``schema_version``; ``source`` (``kind``: folder, glob or dicomweb;
    ``archive_root``: the folder DicomPath is relative to, None for DICOMweb;
    ``dicomweb_url``); ``inputs`` (= indexed + rejected + filtered_out);
    ``indexed``; ``rejected`` and ``rejected_by_reason``; ``duplicates``;
    ``filtered_out`` and ``filtered_by``; ``filters``; ``labels`` (None
    without a labels file, else ``file``, ``key``, ``column``, ``labelled``,
    ``unlabelled``, ``unmatched`` and ``unmatched_by_reason``); ``files``.

    Raises:
        RuntimeError: when a count is negative or unknown (the counts are the job's).
    """
    known = {INDEXED, LABELLED, UNLABELLED}
    prefixes = ("filtered/", "rejected/", "unmatched/")
    odd = [k for k, v in counts.items() if v < 0 or (k not in known and not k.startswith(prefixes))]
    if odd:
        raise RuntimeError(f"unexpected counts: {odd}")

    def by(prefix: str) -> dict[str, int]:
        return {k[len(prefix) :]: v for k, v in sorted(counts.items()) if k.startswith(prefix)}

    rejected, filtered = by("rejected/"), by("filtered/")
    indexed = counts.get(INDEXED, 0)
    summary: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "inputs": indexed + sum(rejected.values()) + sum(filtered.values()),
        "indexed": indexed,
        "rejected": sum(rejected.values()),
        "rejected_by_reason": rejected,
        "duplicates": rejected.get("duplicate_instance", 0),
        "filtered_out": sum(filtered.values()),
        "filtered_by": filtered,
        "filters": filters.as_dict(),
        "labels": None,
        "files": [METADATA_FILE, REJECTS_FILE, UNMATCHED_FILE],
    }
    if labels is not None:
        unmatched = by("unmatched/")
        summary["labels"] = {
            **labels,
            "labelled": counts.get(LABELLED, 0),
            "unlabelled": counts.get(UNLABELLED, 0),
            "unmatched": sum(unmatched.values()),
            "unmatched_by_reason": unmatched,
        }
    return summary
