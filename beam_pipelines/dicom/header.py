"""The header fields the pipeline records (:class:`DicomHeader`), and small typed getters.

The getters read one element of a Dataset and turn anything malformed into
"absent" (a default), never an error: headers in the wild are often wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

#: Photometric interpretations decoded as grayscale, and as colour.
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
COLOR = (
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_PARTIAL_420",
    "YBR_ICT",
    "YBR_RCT",
    "PALETTE COLOR",
)


@dataclasses.dataclass(frozen=True)
class DicomHeader:
    """The header fields the pipeline records for each image.

    ``patient_id`` is PHI: it fills the predictions of archives scored without
    metadata.csv, and is never logged.
    """

    rows: int
    columns: int
    number_of_frames: int
    samples_per_pixel: int
    photometric_interpretation: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    transfer_syntax_uid: str
    modality: str
    patient_id: str
    study_id: str
    view_position: str
    patient_age: int | None
    patient_sex: str | None
    sop_instance_uid: str
    pixel_spacing: tuple[float, float] | None
    #: (keyword, value) of the header elements a result written back as DICOM
    #: needs (``DecodeOptions.reference_keywords``; absent: ""); PHI, never logged.
    reference: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Returns the fields as a plain dict (JSON-friendly)."""
        return dataclasses.asdict(self)


def read_header(ds: Dataset, reference_keywords: tuple[str, ...] = ()) -> DicomHeader:
    """Extracts the fields the pipeline records (no pixel decoding).

    Malformed optional values (age, sex, spacing) become None, never errors.
    ``reference_keywords`` are also kept, as strings, in ``reference``.
    """
    from beam_pipelines.contracts.metadata import parse_age, parse_sex

    return DicomHeader(
        rows=int_value(ds, "Rows"),
        columns=int_value(ds, "Columns"),
        number_of_frames=max(1, int_value(ds, "NumberOfFrames", 1)),
        samples_per_pixel=int_value(ds, "SamplesPerPixel", 1),
        photometric_interpretation=str_value(ds, "PhotometricInterpretation").upper(),
        bits_allocated=int_value(ds, "BitsAllocated"),
        bits_stored=int_value(ds, "BitsStored", int_value(ds, "BitsAllocated")),
        pixel_representation=int_value(ds, "PixelRepresentation"),
        transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")),
        modality=str_value(ds, "Modality"),
        patient_id=str_value(ds, "PatientID"),
        # StudyID is short and often blank; the instance UID always names the study.
        study_id=str_value(ds, "StudyID") or str_value(ds, "StudyInstanceUID"),
        view_position=str_value(ds, "ViewPosition").upper(),
        patient_age=parse_age(str_value(ds, "PatientAge")),
        patient_sex=parse_sex(str_value(ds, "PatientSex")),
        sop_instance_uid=str_value(ds, "SOPInstanceUID"),
        pixel_spacing=_spacing(ds),
        reference=tuple((keyword, str_value(ds, keyword)) for keyword in reference_keywords),
    )


def element_value(ds: Dataset, keyword: str) -> Any:
    """The element's value, or None when absent or undecodable."""
    try:
        return ds.get(keyword)
    except Exception:  # an undecodable value reads as absent
        return None


def sequence_items(ds: Dataset, keyword: str) -> list[Dataset]:
    """A sequence's items; a tag written with another VR reads as absent."""
    value = element_value(ds, keyword)
    if isinstance(value, pydicom.sequence.Sequence):
        return [item for item in value if isinstance(item, Dataset)]
    return []


def int_value(ds: Dataset, keyword: str, default: int = 0) -> int:
    """The (first) value as an int, or ``default`` when absent, empty or not a number."""
    value = element_value(ds, keyword)
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if value else None
    try:
        return int(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def str_value(ds: Dataset, keyword: str) -> str:
    """The value as a stripped string; "" when absent."""
    value = element_value(ds, keyword)
    return "" if value is None else str(value).strip()


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = element_value(ds, keyword)
        try:
            if value is not None and len(value) == 2:
                return (float(value[0]), float(value[1]))
        except (TypeError, ValueError):
            continue
    return None


def float_value(ds: Dataset, keyword: str, default: float) -> float:
    """The first value as a finite float, or ``default``."""
    values = float_values(ds, keyword)
    return values[0] if values else default


def float_values(ds: Dataset, keyword: str) -> list[float]:
    """Every value as a finite float; [] when absent or when any is not one."""
    value = element_value(ds, keyword)
    if value is None or value == "":
        return []
    items = value if isinstance(value, pydicom.multival.MultiValue | list | tuple) else [value]
    out = []
    for item in items:
        try:
            number = float(item)
        except (TypeError, ValueError):
            return []
        if not np.isfinite(number):
            return []
        out.append(number)
    return out
