"""Keyed pseudonyms for patient identifiers, the same in every job.

With ``--pseudonymize_key_file`` (or ``--pseudonymize_key``), preprocessing
and scoring replace every identifier they write — PatientID, StudyID, the
DICOM path (archive paths often contain the PatientID), the SOP Instance
UID and the extra columns that identify images (study, series and instance
UIDs and accession numbers, as ``xray-index`` writes them) — with
``HMAC-SHA256(key, value)`` truncated to 128 bits (32 hex digits).
The same key gives the same pseudonym in every job and every run, so shards,
predictions and analysis still join by patient and study; without the key
the original values cannot be recovered or guessed by hashing candidates.
Whoever holds the key and metadata.csv can map pseudonyms back by hashing
their own values.

Empty values stay empty (they identify nobody). Row numbers, labels, ages,
sex and view positions are kept: they are what the results are about.

Logs and reject details never carry header values either: :func:`redact`
blanks them in exception messages, and :func:`install_log_filters` (called by
every entry point and by the DoFns that decode, never at import) does the
same for pydicom's own log messages and warnings.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import logging
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from beam_pipelines.contracts.metadata import IDENTIFYING_EXTRA_COLUMNS

#: Shortest key accepted, in bytes: a guessable key makes pseudonyms reversible.
MIN_KEY_BYTES = 16
#: Fields of ValidRow, reject records, schema records and prediction rows
#: that identify a patient.
IDENTIFIER_FIELDS: tuple[str, ...] = ("patient_id", "study_id", "dicom_path", "sop_instance_uid")
#: Extra metadata columns that identify an image (the contract's list).
IDENTIFIER_COLUMNS: tuple[str, ...] = IDENTIFYING_EXTRA_COLUMNS


class Pseudonymizer:
    """Maps identifiers to keyed pseudonyms; picklable, so DoFns can hold one."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the pseudonymization key must have at least {MIN_KEY_BYTES} bytes")
        self._key = key

    def __call__(self, value: str) -> str:
        if not value:
            return value
        return hmac.new(self._key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    @property
    def fingerprint(self) -> str:
        """Names the key without revealing it (recorded in manifests to match jobs)."""
        return hmac.new(self._key, b"xray-pipelines key check", hashlib.sha256).hexdigest()[:16]

    def record(self, record: dict[str, Any]) -> dict[str, Any]:
        """A copy of a dict record with its identifier fields replaced."""
        out = dict(record)
        for field in IDENTIFIER_FIELDS:
            if isinstance(out.get(field), str):
                out[field] = self(out[field])
        return out

    def row(self, row: Any) -> Any:
        """A copy of a ValidRow with its identifiers replaced (``resolved_path`` kept to read)."""
        extra = {
            name: self(value) if name in IDENTIFIER_COLUMNS else value
            for name, value in row.extra.items()
        }
        return dataclasses.replace(
            row,
            patient_id=self(row.patient_id),
            study_id=self(row.study_id),
            dicom_path=self(row.dicom_path),
            extra=extra,
        )


def add_pseudonymize_arguments(parser: argparse.ArgumentParser) -> None:
    """The key flags, shared by preprocessing and scoring so they always match."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--pseudonymize_key_file",
        help="File (path or URI) whose bytes are the key: replaces PatientID, StudyID, "
        "DicomPath and SOPInstanceUID in every output with a keyed HMAC, the same in "
        f"every job (>= {MIN_KEY_BYTES} bytes; surrounding whitespace is ignored).",
    )
    group.add_argument(
        "--pseudonymize_key",
        help="The key itself (prefer --pseudonymize_key_file: a key on the command line "
        "is visible in process lists and shell history).",
    )


def pseudonymizer_from_args(args: argparse.Namespace) -> Pseudonymizer | None:
    """The Pseudonymizer the flags ask for, or None.

    Raises:
        ValueError: for a missing, unreadable or too short key.
    """
    if args.pseudonymize_key is not None:
        return Pseudonymizer(args.pseudonymize_key.encode("utf-8"))
    if args.pseudonymize_key_file is not None:
        # Imported here: the rest of this module (redaction) must not pull in Beam.
        from apache_beam.io.filesystems import FileSystems

        try:
            with FileSystems.open(args.pseudonymize_key_file) as handle:
                key = handle.read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the key file: {type(exc).__name__}") from exc
        return Pseudonymizer(key)
    return None


# --------------------------------------------------------------------------
# Redaction of header values in messages and logs

# What library messages may carry of a header's values (PHI): anything
# quoted, person names (DICOM PN: Family^Given, with the words before it),
# dates, UIDs and other long numbers (IDs). Short numbers (sizes, tags, bit
# depths), byte counts and the standard's own UIDs (1.2.840.10008.*:
# transfer syntaxes, SOP classes) stay readable.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_UNQUOTED_PHI = re.compile(
    r"(?:[A-Z][\w-]* )*\S*\^\S*"
    r"|\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b"
    r"|(?<![\d.])(?!1\.2\.840\.10008\.)\d+(?:\.\d+){3,}\b"
    r"|\b\d{6,}\b(?!(?:\s*(?:of|vs\.?|/|,|and)\s*\d+)*\s*bytes)"
)
# An apostrophe inside a word ("Patient's Age", a name as pydicom quotes it)
# would pair with the next quote and leave the quoted value in the clear.
_IN_WORD_APOSTROPHE = re.compile(r"(?<=\w)'(?=\w)")


def redact_text(text: str) -> str:
    """``text`` with quoted values, person names, dates, UIDs and long IDs blanked."""
    # Quotes first: a quoted name must not take the word before it along.
    unquoted = _QUOTED.sub("…", _IN_WORD_APOSTROPHE.sub("\u2019", text))
    return _UNQUOTED_PHI.sub("…", unquoted)


def redact(exc: BaseException, limit: int = 200) -> str:
    """An exception message without header values (:func:`redact_text`), shortened."""
    return redact_text(str(exc)).replace("\n", " ")[:limit]


class _QuietPluginErrors(logging.Filter):
    """Drops pydicom's per-plugin tracebacks while dicom decodes (:func:`quiet_plugin_errors`).

    pydicom logs each failing plugin at ERROR before raising; we turn the
    failure into a reject record, so a broken file would otherwise print
    several tracebacks to every worker log.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.active, "on", False)


_quiet = _QuietPluginErrors()


class _RedactValues(logging.Filter):
    """Blanks header values in pydicom's log messages (:func:`redact_text`): they are PHI.

    E.g. "Invalid value for VR AS: '<the value>'" becomes "... VR AS: …".
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact_text(record.getMessage()), None
        return True


_redact = _RedactValues()
# pydicom's loggers whose messages may quote header values; the third one also
# logs the per-plugin tracebacks _QuietPluginErrors drops. urllib3 logs each
# request's URL at DEBUG: a DICOMweb URL holds study, series and instance UIDs.
_REDACTED_LOGGERS = (
    "pydicom",
    "pydicom.pixels.utils",
    "pydicom.pixels.decoders.base",
    "urllib3.connectionpool",
    # highdicom's SR building logs source UIDs ("copy ... attributes from dataset
    # <UID>") at INFO and may warn with a patient's name.
    "highdicom.base",
    "highdicom.sr.sop",
    "highdicom.sr.templates",
    "highdicom.sr.content",
    "highdicom.sr.coding",
)
#: highdicom's informational lines say nothing a user needs and quote header values.
_QUIETED_LOGGER = "highdicom"
_PLUGIN_LOGGER = "pydicom.pixels.decoders.base"


def install_log_filters() -> None:
    """Redacts pydicom's log messages, drops its unredacted warnings, quiets plugin errors.

    Process-wide, so called by the entry points (:func:`beam_pipelines.cli.main`)
    and by the ``setup()`` of every DoFn that decodes (Beam workers never run
    the CLI); never at import. Idempotent: calling it again changes nothing.
    """
    # addFilter skips a filter the logger already has; the quiet filter goes
    # first so a dropped traceback is not redacted for nothing.
    logging.getLogger(_PLUGIN_LOGGER).addFilter(_quiet)
    for name in _REDACTED_LOGGERS:
        logging.getLogger(name).addFilter(_redact)
    logging.getLogger(_QUIETED_LOGGER).setLevel(logging.WARNING)
    # pydicom sends each warning both to its (now redacted) logger and through
    # warnings.warn with the values in clear: drop the unredacted duplicate.
    # filterwarnings replaces an identical earlier entry instead of adding one.
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    warnings.filterwarnings("ignore", module=r"highdicom(\.|$)")


@contextmanager
def quiet_plugin_errors() -> Iterator[None]:
    """Within it, this thread's pydicom plugin tracebacks are dropped (once installed)."""
    _quiet.active.on = True
    try:
        yield
    finally:
        _quiet.active.on = False
