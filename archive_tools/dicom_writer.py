"""The one place that writes DICOM radiographs.

Used by the synthetic archive generator, the image importer and decoder tests.
It owns the *pixel convention* the preprocessing decoder inverts:

* ``display`` images are float in [0, 1], higher = brighter.
* The stored range is ``[smin, smax]`` = ``[0, 2**bits - 1]`` (unsigned) or
  ``[-2**(bits-1), 2**(bits-1) - 1]`` (signed), ``bits`` = BitsStored.
* ``v = display`` for MONOCHROME2 and ``1 - display`` for MONOCHROME1 (display
  clipped to [0, 1]; numpy rint, i.e. halves round to even);
  ``stored = round(smin + v * (smax - smin))``, clipped to the range.
* Rescale slope/intercept are header fields only: with
  ``DecodeOptions(range_source="bit_range")`` the decoder maps stored values
  to modality units and scales by the modality range of the bit range, which
  is linear, so it recovers the same display image (by default it scales by
  the image's own range instead).

:func:`to_stored` implements the forward mapping, :func:`from_stored` its
inverse (bit-range scaling, no VOI window): the ground truth for tests.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from beam_pipelines.contracts.metadata import format_dicom_age

logger = logging.getLogger(__name__)

#: Encoding name -> transfer syntax. Every name but ``jpeg_baseline`` is lossless.
ENCODINGS: dict[str, UID] = {
    "explicit_le": ExplicitVRLittleEndian,
    "implicit_le": ImplicitVRLittleEndian,
    "big_endian": ExplicitVRBigEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "j2k": JPEG2000Lossless,
    "jpeg_baseline": JPEGBaseline8Bit,
}
#: Encodings that need 8-bit unsigned pixels.
EIGHT_BIT_ONLY: frozenset[str] = frozenset({"jpeg_baseline"})
#: Encodings that reproduce the stored pixels exactly.
LOSSLESS_ENCODINGS: tuple[str, ...] = tuple(n for n in ENCODINGS if n not in EIGHT_BIT_ONLY)

#: Modality -> default SOP class.
SOP_CLASSES: dict[str, UID] = {
    "DX": DigitalXRayImageStorageForPresentation,
    "CR": ComputedRadiographyImageStorage,
    "OT": SecondaryCaptureImageStorage,
}
PHOTOMETRICS: frozenset[str] = frozenset({"MONOCHROME1", "MONOCHROME2"})
VIEW_POSITIONS: frozenset[str] = frozenset({"PA", "AP", "LATERAL", "LL", "RL", ""})

# Pillow quality 95 keeps the mean error well under 2 grey levels on radiographs.
_JPEG_QUALITY = 95
# Pinned encoder plugins: output bytes stay identical across machines, and GDCM's
# RLE encoder (pydicom's first choice when installed) aborts the process on odd widths.
_ENCODER_PLUGINS = {"rle": "pylibjpeg", "jpegls": "pyjpegls", "j2k": "pylibjpeg"}
_NATIVE_ENCODINGS = frozenset({"explicit_le", "implicit_le", "big_endian", "deflate"})


@dataclass(frozen=True)
class PixelFormat:
    """How pixel values are stored and described in the header.

    Attributes:
        bits_stored: BitsStored, 8..16. BitsAllocated is 8 for <= 8, else 16.
        photometric: ``"MONOCHROME1"`` (high = dark) or ``"MONOCHROME2"``.
        signed: PixelRepresentation 1 (two's complement) when True.
        rescale_slope: RescaleSlope; must be > 0 so rescaling never flips brightness.
        rescale_intercept: RescaleIntercept.
        window_center: WindowCenter in modality units (after rescale), or None.
        window_width: WindowWidth (> 0), or None; set both window fields or neither.

    Raises:
        ValueError: In ``__post_init__`` when a field is out of range.
    """

    bits_stored: int = 12
    photometric: str = "MONOCHROME2"
    signed: bool = False
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    window_center: float | None = None
    window_width: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits_stored, bool) or not isinstance(self.bits_stored, int | np.integer):
            raise ValueError(f"bits_stored must be an int, got {self.bits_stored!r}")
        if not 8 <= self.bits_stored <= 16:
            raise ValueError(f"bits_stored must be in 8..16, got {self.bits_stored}")
        if self.photometric not in PHOTOMETRICS:
            raise ValueError(
                f"photometric must be one of {sorted(PHOTOMETRICS)}, got {self.photometric!r}"
            )
        if not isinstance(self.signed, bool | np.bool_):
            raise ValueError(f"signed must be a bool, got {self.signed!r}")
        if not (math.isfinite(self.rescale_slope) and self.rescale_slope > 0):
            raise ValueError(f"rescale_slope must be finite and > 0, got {self.rescale_slope}")
        if not math.isfinite(self.rescale_intercept):
            raise ValueError(f"rescale_intercept must be finite, got {self.rescale_intercept}")
        if (self.window_center is None) != (self.window_width is None):
            raise ValueError("window_center and window_width must be given together or not at all")
        if self.window_center is not None and self.window_width is not None:
            if not math.isfinite(self.window_center):
                raise ValueError(f"window_center must be finite, got {self.window_center}")
            if not (math.isfinite(self.window_width) and self.window_width > 0):
                raise ValueError(f"window_width must be finite and > 0, got {self.window_width}")

    @property
    def bits_allocated(self) -> int:
        """BitsAllocated: 8 for up to 8 bits stored, else 16."""
        return 8 if self.bits_stored <= 8 else 16

    @property
    def stored_range(self) -> tuple[int, int]:
        """The inclusive range ``(smin, smax)`` of stored values."""
        if self.signed:
            return -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        return 0, 2**self.bits_stored - 1

    @property
    def modality_range(self) -> tuple[float, float]:
        """The stored range mapped through the rescale (slope > 0 keeps the order)."""
        smin, smax = self.stored_range
        return (
            smin * self.rescale_slope + self.rescale_intercept,
            smax * self.rescale_slope + self.rescale_intercept,
        )

    @property
    def has_rescale(self) -> bool:
        """True when the rescale is not the identity (then the header carries it)."""
        return self.rescale_slope != 1.0 or self.rescale_intercept != 0.0

    @property
    def has_window(self) -> bool:
        """True when a VOI window is set."""
        return self.window_center is not None

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of stored arrays (native byte order)."""
        if self.bits_allocated == 8:
            return np.dtype(np.int8 if self.signed else np.uint8)
        return np.dtype(np.int16 if self.signed else np.uint16)


def to_stored(display: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """Maps a display image to stored pixel values (see the module docstring).

    Args:
        display: 2-D float array in [0, 1], higher = brighter; values outside
            are clipped.
        fmt: The target pixel format.

    Returns:
        A 2-D array of ``fmt.dtype``.

    Raises:
        ValueError: If ``display`` is not 2-D or contains NaN.
    """
    display = np.asarray(display)
    if display.ndim != 2:
        raise ValueError(f"display image must be 2-D, got shape {display.shape}")
    value = display.astype(np.float64, copy=False)
    if np.isnan(value).any():
        raise ValueError("display image contains NaN")
    if fmt.photometric == "MONOCHROME1":
        value = 1.0 - value
    smin, smax = fmt.stored_range
    stored = np.rint(smin + np.clip(value, 0.0, 1.0) * (smax - smin))
    return np.clip(stored, smin, smax).astype(fmt.dtype)


def from_stored(stored: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """Inverse of :func:`to_stored`: bit-range scaling to display, no VOI window.

    Args:
        stored: Stored pixel values (any integer or float dtype).
        fmt: The pixel format they were stored with.

    Returns:
        float32 array in [0, 1], higher = brighter.
    """
    smin, smax = fmt.stored_range
    value = (np.asarray(stored, dtype=np.float64) - smin) / (smax - smin)
    if fmt.photometric == "MONOCHROME1":
        value = 1.0 - value
    return value.astype(np.float32)


@dataclass(frozen=True)
class RadiographHeader:
    """Patient, study and acquisition fields of one radiograph.

    UIDs not given are generated deterministically with
    ``pydicom.uid.generate_uid(entropy_srcs=[...])`` from ``uid_seed``,
    ``patient_id``, ``study_id``, series and instance numbers, so the same
    inputs always give the same file.

    Attributes:
        patient_id: PatientID.
        study_id: StudyID (SH, at most 16 characters).
        view_position: ViewPosition (PA, AP, LATERAL, LL, RL, or "" if unknown).
        modality: Modality: CR, DX or OT.
        patient_age: Age in whole years (written as ``065Y``), or None.
        patient_sex: ``M``, ``F``, ``O`` or None (written empty).
        patient_name: PatientName; synthetic (``SYNTH^P000123``) or empty.
        pixel_spacing: (row, column) spacing in mm, or None when unknown
            (PixelSpacing and ImagerPixelSpacing are then omitted).
        body_part: BodyPartExamined.
        study_date: StudyDate, ``YYYYMMDD``.
        study_time: StudyTime, ``HHMMSS``.
        series_number: SeriesNumber.
        instance_number: InstanceNumber.
        sop_class: SOPClassUID; None picks it from ``modality`` (DX for
            Presentation, CR, Secondary Capture).
        study_instance_uid: StudyInstanceUID, or None to derive it.
        series_instance_uid: SeriesInstanceUID, or None to derive it.
        sop_instance_uid: SOPInstanceUID, or None to derive it.
        accession_number: AccessionNumber, or None to derive it from the
            StudyInstanceUID (one per study, so label joins by accession work).
        uid_seed: Extra entropy for derived UIDs (e.g. the generator seed) so
            different archives with the same IDs get different UIDs.
        extra: DICOM keyword -> value, set last (overrides anything above).
    """

    patient_id: str
    study_id: str
    view_position: str = "PA"
    modality: str = "DX"
    patient_age: int | None = None
    patient_sex: str | None = None
    patient_name: str = ""
    pixel_spacing: tuple[float, float] | None = (0.2, 0.2)
    body_part: str = "CHEST"
    study_date: str = "20240101"
    study_time: str = "120000"
    series_number: int = 1
    instance_number: int = 1
    sop_class: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    accession_number: str | None = None
    uid_seed: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in SOP_CLASSES:
            raise ValueError(f"modality must be one of {sorted(SOP_CLASSES)}, got {self.modality}")
        if len(self.study_id) > 16:
            raise ValueError(f"study_id must be at most 16 characters: {self.study_id!r}")
        if self.patient_sex not in (None, "M", "F", "O"):
            raise ValueError(f"patient_sex must be M, F, O or None, got {self.patient_sex!r}")
        if self.patient_age is not None:
            format_dicom_age(self.patient_age)  # Raises ValueError when out of range.

    def uids(self) -> tuple[UID, UID, UID]:
        """Returns (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID)."""
        base = [self.uid_seed, self.patient_id, self.study_id]
        study = UID(self.study_instance_uid or generate_uid(entropy_srcs=[*base, "study"]))
        series = UID(
            self.series_instance_uid
            or generate_uid(entropy_srcs=[*base, "series", str(self.series_number)])
        )
        sop = UID(
            self.sop_instance_uid
            or generate_uid(
                entropy_srcs=[*base, "sop", str(self.series_number), str(self.instance_number)]
            )
        )
        return study, series, sop

    def accession(self) -> str:
        """AccessionNumber: the given one, else 16 characters (SH) derived from the study's UID."""
        if self.accession_number is not None:
            return self.accession_number
        digest = hashlib.sha256(str(self.uids()[0]).encode("ascii")).hexdigest()
        return f"A{int(digest, 16) % 10**15:015d}"


def _ds(value: float) -> DSfloat:
    # auto_format keeps DS values within their 16-character limit.
    return DSfloat(value, auto_format=True)


def build_dataset(
    stored: np.ndarray, fmt: PixelFormat, encoding: str, header: RadiographHeader
) -> Dataset:
    """Builds the complete dataset (file meta and encoded pixel data) without writing it.

    Args:
        stored: 2-D integer array of stored values within ``fmt.stored_range``.
        fmt: Pixel format.
        encoding: A key of :data:`ENCODINGS`.
        header: Patient/study fields.

    Returns:
        A dataset ready for ``pydicom.dcmwrite(..., enforce_file_format=True)``.

    Raises:
        ValueError: On an unknown encoding, a pixel array that does not fit
            ``fmt``, or a format the encoding cannot carry.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    stored = np.asarray(stored)
    if stored.ndim != 2 or min(stored.shape) < 1:
        raise ValueError(f"stored pixels must be a non-empty 2-D array, got shape {stored.shape}")
    if not np.issubdtype(stored.dtype, np.integer):
        raise ValueError(f"stored pixels must be integers, got {stored.dtype}")
    smin, smax = fmt.stored_range
    lo, hi = int(stored.min()), int(stored.max())
    if lo < smin or hi > smax:
        raise ValueError(
            f"stored values [{lo}, {hi}] do not fit {fmt.bits_stored}-bit "
            f"{'signed' if fmt.signed else 'unsigned'} range [{smin}, {smax}]"
        )
    if encoding in EIGHT_BIT_ONLY and (fmt.bits_stored != 8 or fmt.signed):
        raise ValueError(f"{encoding} needs 8-bit unsigned pixels, got {fmt}")
    arr = stored.astype(fmt.dtype)
    rows, cols = arr.shape
    study_uid, series_uid, sop_uid = header.uids()
    sop_class = UID(header.sop_class or SOP_CLASSES[header.modality])

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ENCODINGS[encoding]

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = header.study_date
    ds.SeriesDate = header.study_date
    ds.ContentDate = header.study_date
    ds.StudyTime = header.study_time
    ds.ContentTime = header.study_time
    ds.AccessionNumber = header.accession()
    ds.Modality = header.modality
    if header.modality == "OT":
        ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = header.patient_sex or ""
    ds.PatientAge = "" if header.patient_age is None else format_dicom_age(header.patient_age)
    ds.BodyPartExamined = header.body_part
    ds.ViewPosition = header.view_position
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = header.study_id
    ds.SeriesNumber = header.series_number
    ds.InstanceNumber = header.instance_number
    ds.PatientOrientation = ""
    if header.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    if header.pixel_spacing is not None:
        if header.modality in ("DX", "CR"):
            ds.ImagerPixelSpacing = [_ds(v) for v in header.pixel_spacing]
        ds.PixelSpacing = [_ds(v) for v in header.pixel_spacing]
    ds.BurnedInAnnotation = "NO"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = fmt.photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = fmt.bits_allocated
    ds.BitsStored = fmt.bits_stored
    ds.HighBit = fmt.bits_stored - 1
    ds.PixelRepresentation = int(fmt.signed)
    if fmt.has_rescale:
        ds.RescaleIntercept = _ds(fmt.rescale_intercept)
        ds.RescaleSlope = _ds(fmt.rescale_slope)
        ds.RescaleType = "US"
    if fmt.window_center is not None and fmt.window_width is not None:
        ds.WindowCenter = _ds(fmt.window_center)
        ds.WindowWidth = _ds(fmt.window_width)
    ds.LossyImageCompression = "00"

    for keyword, value in header.extra.items():
        setattr(ds, keyword, value)

    _set_pixel_data(ds, arr, fmt, encoding)
    return ds


def _set_pixel_data(ds: Dataset, arr: np.ndarray, fmt: PixelFormat, encoding: str) -> None:
    if encoding in _NATIVE_ENCODINGS:
        order = ">" if encoding == "big_endian" else "<"
        # pydicom writes PixelData bytes as given, so big endian must be swapped here.
        data = arr.astype(arr.dtype.newbyteorder(order)).tobytes()
        if len(data) % 2:
            data += b"\x00"  # DICOM values have even length.
        ds.PixelData = data
        ds["PixelData"].VR = "OB" if fmt.bits_allocated == 8 else "OW"
    elif encoding == "jpeg_baseline":
        buffer = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buffer, format="JPEG", quality=_JPEG_QUALITY)
        frame = buffer.getvalue()
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = _ds(round(arr.nbytes / len(frame), 2))
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    else:
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OB" if fmt.bits_allocated == 8 else "OW"
        # compress() would replace the SOPInstanceUID with a random one by default.
        ds.compress(
            ENCODINGS[encoding],
            arr,
            encoding_plugin=_ENCODER_PLUGINS[encoding],
            generate_instance_uid=False,
        )


def write_dicom(
    target: str | os.PathLike[str] | BinaryIO,
    stored: np.ndarray,
    fmt: PixelFormat,
    encoding: str,
    header: RadiographHeader,
) -> None:
    """Writes one single-frame grayscale radiograph as a DICOM Part 10 file.

    Args:
        target: A path or a writable binary file object.
        stored: 2-D integer array of stored values (e.g. from :func:`to_stored`).
        fmt: Pixel format (bits, photometric, sign, rescale, window).
        encoding: A key of :data:`ENCODINGS`.
        header: Patient/study fields.

    Raises:
        ValueError: See :func:`build_dataset`.
    """
    ds = build_dataset(stored, fmt, encoding, header)
    pydicom.dcmwrite(target, ds, enforce_file_format=True)
