"""beam_pipelines.contracts.splits: patient-level, stratified, deterministic, pinnable."""

from __future__ import annotations

import random

import pytest

from beam_pipelines.contracts.splits import (
    SPLITS,
    assign_splits,
    format_splits_csv,
    parse_ratios,
    read_splits_csv,
)


def _patients(n: int, prevalence: float = 0.3, seed: int = 0) -> list[tuple[str, bool]]:
    rng = random.Random(seed)
    return [(f"P{i:06d}", rng.random() < prevalence) for i in range(n)]


@pytest.mark.parametrize("n", [1, 7, 50, 997])
def test_each_stratum_is_within_one_patient_of_target(n: int) -> None:
    patients = _patients(n)
    ratios = (0.8, 0.1, 0.1)
    assignment = assign_splits(patients, ratios, seed=3)
    assert set(assignment) == {p for p, _ in patients}
    for label in (False, True):
        members = [p for p, a in patients if a == label]
        for split, ratio in zip(SPLITS, ratios, strict=True):
            count = sum(assignment[p] == split for p in members)
            assert abs(count - ratio * len(members)) < 1


def test_deterministic_and_independent_of_input_order() -> None:
    patients = _patients(200)
    shuffled = patients[:]
    random.Random(1).shuffle(shuffled)
    assert assign_splits(patients, (0.8, 0.1, 0.1), 5) == assign_splits(
        shuffled, (0.8, 0.1, 0.1), 5
    )
    assert assign_splits(patients, (0.8, 0.1, 0.1), 5) != assign_splits(
        patients, (0.8, 0.1, 0.1), 6
    )


def test_pinned_patients_never_move_and_growth_stays_balanced() -> None:
    old = _patients(300, seed=1)
    first = assign_splits(old, (0.7, 0.15, 0.15), seed=0)
    grown = old + [(f"N{i:06d}", a) for i, (_, a) in enumerate(_patients(300, seed=2))]
    pinned = read_splits_csv(format_splits_csv(first))
    second = assign_splits(grown, (0.7, 0.15, 0.15), seed=0, pinned=pinned)
    assert all(second[p] == first[p] for p, _ in old)
    for label in (False, True):
        members = [p for p, a in grown if a == label]
        train = sum(second[p] == "train" for p in members)
        assert abs(train - 0.7 * len(members)) < 2


def test_ratios_parse_and_validate() -> None:
    assert parse_ratios("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    for bad in ("0.8,0.2", "0.5,0.5,0.5", "a,b,c", "1.2,-0.1,-0.1"):
        with pytest.raises(ValueError):
            parse_ratios(bad)


def test_splits_csv_errors() -> None:
    with pytest.raises(ValueError, match="columns"):
        read_splits_csv("patient,split\nP1,train\n")
    with pytest.raises(ValueError, match="unknown split"):
        read_splits_csv("PatientID,split\nP1,holdout\n")
    with pytest.raises(ValueError, match="two splits"):
        read_splits_csv("PatientID,split\nP1,train\nP1,test\n")
    with pytest.raises(ValueError):
        assign_splits([("P1", True)], (1, 0, 0), 0, pinned={"P1": "holdout"})
