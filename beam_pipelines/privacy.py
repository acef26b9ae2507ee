"""Keyed pseudonyms for patient identifiers, the same in every job.

With ``--pseudonymize_key_file`` (or ``--pseudonymize_key``), preprocessing
and scoring replace every identifier they write — PatientID, StudyID, the
DICOM path (archive paths often contain the PatientID) and the SOP Instance
UID — with ``HMAC-SHA256(key, value)`` truncated to 128 bits (32 hex digits).
The same key gives the same pseudonym in every job and every run, so shards,
predictions and analysis still join by patient and study; without the key
the original values cannot be recovered or guessed by hashing candidates.
Whoever holds the key and metadata.csv can map pseudonyms back by hashing
their own values.

Empty values stay empty (they identify nobody). Row numbers, labels, ages,
sex and view positions are kept: they are what the results are about.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
from typing import Any

from apache_beam.io.filesystems import FileSystems

#: Shortest key accepted, in bytes: a guessable key makes pseudonyms reversible.
MIN_KEY_BYTES = 16
#: Fields of ValidRow, reject records, schema records and prediction rows
#: that identify a patient.
IDENTIFIER_FIELDS: tuple[str, ...] = ("patient_id", "study_id", "dicom_path", "sop_instance_uid")


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
        return dataclasses.replace(
            row,
            patient_id=self(row.patient_id),
            study_id=self(row.study_id),
            dicom_path=self(row.dicom_path),
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
        try:
            with FileSystems.open(args.pseudonymize_key_file) as handle:
                key = handle.read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the key file: {type(exc).__name__}") from exc
        return Pseudonymizer(key)
    return None
