"""beam_pipelines.contracts.predictions: the Parquet contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from beam_pipelines.contracts import predictions


def test_write_read_round_trip_with_nulls(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    predictions.write(
        str(path),
        {
            "dicom_path": ["a.dcm", "b.dcm"],
            "score": [0.1, 0.9],
            "model_id": ["m", "m"],
            "label": [0, None],
            "age": [None, 40],
        },
    )
    table = predictions.read(str(path))
    assert table.schema == predictions.SCHEMA
    assert table.column("label").to_pylist() == [0, None]
    assert table.column("split").null_count == 2


def test_contract_violations_are_errors() -> None:
    with pytest.raises(ValueError, match="missing"):
        predictions.to_table({"dicom_path": ["a"], "score": [0.5]})
    with pytest.raises(ValueError, match="unknown"):
        predictions.to_table({"dicom_path": ["a"], "score": [0.5], "model_id": ["m"], "x": [1]})
    with pytest.raises(ValueError, match="lengths"):
        predictions.to_table({"dicom_path": ["a", "b"], "score": [0.5], "model_id": ["m"]})
