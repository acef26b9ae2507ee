"""Keyed pseudonyms: deterministic per key, irreversible without it, the same in every job."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest

from beam_pipelines.privacy import (
    Pseudonymizer,
    add_pseudonymize_arguments,
    pseudonymizer_from_args,
)
from beam_pipelines.transforms.rows import ValidRow

KEY = b"0123456789abcdef-test-key"


def test_same_key_same_pseudonym_other_key_other_pseudonym() -> None:
    first, again, other = Pseudonymizer(KEY), Pseudonymizer(KEY), Pseudonymizer(KEY + b"x")
    assert first("P000001") == again("P000001")
    assert first("P000001") != other("P000001")
    assert first("P000001") != first("P000002")
    assert len(first("P000001")) == 32 and int(first("P000001"), 16) >= 0
    assert "P000001" not in first("P000001")
    assert first.fingerprint == again.fingerprint != other.fingerprint


def test_empty_values_stay_empty() -> None:
    assert Pseudonymizer(KEY)("") == ""


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Pseudonymizer(b"short")


def test_records_and_rows_lose_every_identifier() -> None:
    pseudonymize = Pseudonymizer(KEY)
    record = {
        "row": 7,
        "patient_id": "P1",
        "study_id": "S1",
        "dicom_path": "raw/P1/S1_1.dcm",
        "sop_instance_uid": "1.2.3",
        "label": 1,
        "reason": "truncated",
    }
    out = pseudonymize.record(record)
    assert out["row"] == 7 and out["label"] == 1 and out["reason"] == "truncated"
    for field in ("patient_id", "study_id", "dicom_path", "sop_instance_uid"):
        assert out[field] == pseudonymize(record[field])
    assert record["patient_id"] == "P1"  # the input is not modified

    row = ValidRow(1, "P1", "S1", "raw/P1/a.dcm", "/archive/raw/P1/a.dcm", "PA", True, 60, "F", {})
    mapped = pseudonymize.row(row)
    assert (mapped.patient_id, mapped.study_id, mapped.dicom_path) == (
        pseudonymize("P1"),
        pseudonymize("S1"),
        pseudonymize("raw/P1/a.dcm"),
    )
    assert mapped.resolved_path == row.resolved_path  # still readable


def test_rows_lose_the_identifying_columns_the_index_writes() -> None:
    pseudonymize = Pseudonymizer(KEY)
    extra = {
        "StudyInstanceUID": "1.2.3",
        "SeriesInstanceUID": "1.2.3.4",
        "SOPInstanceUID": "1.2.3.4.5",
        "AccessionNumber": "A77",
        "Modality": "DX",
        "Site": "north",
    }
    row = ValidRow(1, "P1", "S1", "raw/a.dcm", "/archive/raw/a.dcm", "PA", True, 60, "F", extra)
    mapped = pseudonymize.row(row).extra
    for column in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber"):
        assert mapped[column] == pseudonymize(extra[column])
    assert (mapped["Modality"], mapped["Site"]) == ("DX", "north")
    assert row.extra["AccessionNumber"] == "A77"  # the input is not modified


def test_survives_pickling_for_beam_workers() -> None:
    pseudonymize = Pseudonymizer(KEY)
    assert pickle.loads(pickle.dumps(pseudonymize))("P1") == pseudonymize("P1")


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_pseudonymize_arguments(parser)
    return parser.parse_args(argv)


def test_key_from_file_ignores_surrounding_whitespace(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"  " + KEY + b"\n")
    from_file = pseudonymizer_from_args(_args(["--pseudonymize_key_file", str(key_file)]))
    from_flag = pseudonymizer_from_args(_args(["--pseudonymize_key", KEY.decode()]))
    assert from_file is not None and from_flag is not None
    assert from_file("P1") == from_flag("P1")
    assert pseudonymizer_from_args(_args([])) is None


def test_missing_key_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the key file"):
        pseudonymizer_from_args(_args(["--pseudonymize_key_file", str(tmp_path / "none")]))


def test_key_flags_are_exclusive() -> None:
    with pytest.raises(SystemExit):
        _args(["--pseudonymize_key", "a" * 16, "--pseudonymize_key_file", "k"])
