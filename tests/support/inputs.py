"""Small inputs for transform tests: validated rows, synthetic DICOMs, prediction rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from archive_tools.dicom_writer import PixelFormat, RadiographHeader, to_stored, write_dicom
from beam_pipelines.transforms.rows import ValidRow


def valid_row(
    row: int, path: str, root: str = "/archive", patient: str = "P1", abnormal: bool = True
) -> ValidRow:
    """A ValidRow of ``path`` under ``root`` (study S1, PA, 40-year-old M)."""
    return ValidRow(row, patient, "S1", path, f"{root}/{path}", "PA", abnormal, 40, "M", {})


def write_radiograph(
    path: Path,
    patient: str = "P1",
    study: str = "S1",
    shape: tuple[int, int] = (40, 30),
    age: int | None = None,
    sex: str | None = None,
) -> Path:
    """A small 12-bit MONOCHROME2 radiograph (a smooth ramp) written as a DICOM file."""
    fmt = PixelFormat(bits_stored=12)
    image = np.linspace(0, 1, shape[0] * shape[1], dtype=np.float32).reshape(shape)
    header = RadiographHeader(patient, study, patient_age=age, patient_sex=sex)
    write_dicom(path, to_stored(image, fmt), fmt, "explicit_le", header)
    return path


def prediction_row(path: str, score: float, model_id: str = "m") -> dict[str, Any]:
    """A row of the predictions contract (every column; the finding at threshold 0.5)."""
    return {
        "dicom_path": path,
        "patient_id": "P1",
        "study_id": None,
        "view_position": "PA",
        "age": 40,
        "sex": "F",
        "split": None,
        "label": None,
        "score": score,
        "predicted": int(score >= 0.5),
        "model_id": model_id,
    }
