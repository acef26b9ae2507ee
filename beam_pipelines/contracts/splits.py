"""Patient-level, label-stratified, deterministic train/validation/test splits.

A patient is abnormal if any of their images is. Within each label stratum,
patients are ordered by a keyed hash of (seed, PatientID) — a stable shuffle
that does not depend on input order or on the runner — and each is placed in
the split furthest below its target count, so every split ends within one
patient of ``ratio x stratum size``.

Pinned patients (from an earlier ``splits.csv``) keep their split; only new
patients are placed, filling the splits towards the targets of the grown
archive. A patient therefore never moves, and a grown archive never leaks.

Only one small record per patient is held: (PatientID, abnormal).
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterable, Mapping, Sequence

SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLITS_CSV_COLUMNS = ("PatientID", "split")


def parse_ratios(text: str) -> tuple[float, float, float]:
    """Parses ``"0.8,0.1,0.1"`` into (train, validation, test) ratios summing to 1.

    Raises:
        ValueError: for a wrong count, negative values, or a sum far from 1.
    """
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise ValueError(f"split ratios must be numbers, got {text!r}") from exc
    if len(values) != len(SPLITS) or any(v < 0 for v in values):
        raise ValueError(f"give three non-negative ratios train,validation,test; got {text!r}")
    total = sum(values)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split ratios must sum to 1, got {total:g} from {text!r}")
    return values  # type: ignore[return-value]


def order_key(seed: int, name: str) -> bytes:
    """A keyed hash: sorting by it is a stable shuffle that depends only on (seed, name)."""
    return hashlib.sha256(f"{seed}\x00{name}".encode()).digest()


def assign_splits(
    patients: Iterable[tuple[str, bool]],
    ratios: Sequence[float],
    seed: int,
    pinned: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Assigns every patient to a split.

    Args:
        patients: (PatientID, abnormal) once per patient.
        ratios: target fractions for ``SPLITS``.
        seed: changes the stable shuffle.
        pinned: PatientID -> split from an earlier run; kept as they are.

    Returns:
        PatientID -> split for every patient given.

    Raises:
        ValueError: when a pinned split name is unknown.
    """
    pinned = pinned or {}
    unknown = {split for split in pinned.values() if split not in SPLITS}
    if unknown:
        raise ValueError(f"pinned splits name unknown splits {sorted(unknown)}; use {SPLITS}")
    strata: dict[bool, list[str]] = {False: [], True: []}
    for patient_id, abnormal in patients:
        strata[bool(abnormal)].append(patient_id)
    result: dict[str, str] = {}
    for members in strata.values():
        counts = dict.fromkeys(SPLITS, 0)
        new = []
        for patient_id in members:
            if patient_id in pinned:
                result[patient_id] = pinned[patient_id]
                counts[pinned[patient_id]] += 1
            else:
                new.append(patient_id)
        targets = {split: ratio * len(members) for split, ratio in zip(SPLITS, ratios, strict=True)}
        for patient_id in sorted(new, key=lambda p: order_key(seed, p)):
            # Largest deficit first; ties go to the earlier split (train).
            split = max(SPLITS, key=lambda s: (targets[s] - counts[s], -SPLITS.index(s)))
            result[patient_id] = split
            counts[split] += 1
    return result


def read_splits_csv(text: str) -> dict[str, str]:
    """Reads an earlier ``splits.csv`` (PatientID,split) into a mapping.

    Raises:
        ValueError: for missing columns, unknown splits, or a patient listed twice
            in different splits.
    """
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    missing = [c for c in SPLITS_CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"splits.csv lacks columns {missing}")
    pinned: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        patient_id, split = row["PatientID"], row["split"].strip()
        if split not in SPLITS:
            raise ValueError(f"splits.csv line {line}: unknown split {split!r}")
        if pinned.get(patient_id, split) != split:
            raise ValueError(f"splits.csv line {line}: a patient is listed in two splits")
        pinned[patient_id] = split
    return pinned


def format_splits_csv(assignment: Mapping[str, str]) -> str:
    """Formats PatientID -> split as ``splits.csv`` text, sorted by PatientID."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SPLITS_CSV_COLUMNS)
    for patient_id in sorted(assignment):
        writer.writerow((patient_id, assignment[patient_id]))
    return buffer.getvalue()
