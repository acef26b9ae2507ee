"""The metadata.csv contract: column names and tolerant field parsers.

One module owns this contract; the archive writers (synthetic generator,
importer) and the preprocessing job all import it.
"""

from __future__ import annotations

import re

PATIENT_ID = "PatientID"
STUDY_ID = "StudyID"
DICOM_PATH = "DicomPath"
VIEW_POSITION = "ViewPosition"
ABNORMAL = "Abnormal"
AGE = "Age"
SEX = "Sex"

#: Columns every metadata.csv has, in the order the writers emit them.
COLUMNS: tuple[str, ...] = (PATIENT_ID, STUDY_ID, DICOM_PATH, VIEW_POSITION, ABNORMAL, AGE, SEX)
#: Columns without which no row can be used (the rest may be blank).
REQUIRED_COLUMNS: tuple[str, ...] = (PATIENT_ID, DICOM_PATH, ABNORMAL)

_TRUE = {"true", "1", "yes", "y", "t", "abnormal"}
_FALSE = {"false", "0", "no", "n", "f", "normal"}
_AGE = re.compile(r"^\s*(\d{1,3})\s*([YMWD]?)\s*$", re.IGNORECASE)
_SEXES = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}


def parse_label(value: object) -> bool | None:
    """Parses an Abnormal cell (true/false/1/0/yes/no, any case).

    Returns:
        True or False, or None when the value is missing or not a boolean.
    """
    if isinstance(value, bool):
        return value
    text = "" if value is None else str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


def parse_age(value: object) -> int | None:
    """Parses an age in years: ``65``, ``65.0`` or a DICOM age string like ``065Y``.

    Months/weeks/days (``006M``) become whole years. Returns None (unknown)
    for blank, negative, implausible (>150) or malformed values.
    """
    if value is None:
        return None
    text = str(value).strip()
    if text.endswith(".0"):
        text = text[:-2]
    match = _AGE.match(text)
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2).upper() or "Y"
    years = {"Y": number, "M": number // 12, "W": number // 52, "D": number // 365}[unit]
    return years if 0 <= years <= 150 else None


def format_dicom_age(years: int) -> str:
    """Formats whole years as a DICOM Age String (``AS``), e.g. 65 -> ``065Y``."""
    if not 0 <= years <= 999:
        raise ValueError(f"age out of range for a DICOM AS value: {years}")
    return f"{years:03d}Y"


def parse_sex(value: object) -> str | None:
    """Parses a Sex cell to ``M``, ``F`` or ``O``; blank or unknown values give None."""
    text = "" if value is None else str(value).strip().upper()
    return _SEXES.get(text)


def format_label(abnormal: bool) -> str:
    """Formats a label the way the writers emit it (``true``/``false``)."""
    return "true" if abnormal else "false"
