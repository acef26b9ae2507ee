"""The preprocessed-record contract: one ``tf.train.Example`` per image.

Preprocessing writes records with :func:`serialize`; the trainer, the scorer,
the tests and users read them with :func:`parse_example` (numpy); the
trainer parses them inside its ``tf.data`` graph (``trainer.data``) from the
feature keys and layout defined here. Nothing else spells the feature keys.

Pixels are stored losslessly at 16 bits: the [0, 1] float image is rounded to
``uint16`` (``round(x * 65535)``, a step of 1.5e-5, finer than any 12–16-bit
source after normalization) and kept as raw little-endian bytes; the TFRecord
files are gzip-compressed as a whole.

Serializing and parsing use :mod:`beam_pipelines.contracts.example_proto` (the same
wire format, no TensorFlow import).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from beam_pipelines.contracts import example_proto

SCHEMA_VERSION = 1
IMAGE_SIZE = 224
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
IMAGE_BITS = 16
IMAGE_MAX = 2**IMAGE_BITS - 1

IMAGE = "image/raw_u16le"
LABEL = "label"
PATIENT_ID = "patient_id"
STUDY_ID = "study_id"
DICOM_PATH = "dicom_path"
VIEW_POSITION = "view_position"
AGE = "age"
SEX = "sex"
ROWS = "original_rows"
COLUMNS = "original_columns"
SOP_INSTANCE_UID = "sop_instance_uid"
EXTRA = "extra_json"

STRING_FEATURES = (PATIENT_ID, STUDY_ID, DICOM_PATH, VIEW_POSITION, SEX, SOP_INSTANCE_UID, EXTRA)
INT_FEATURES = (LABEL, AGE, ROWS, COLUMNS)
#: ``age`` when unknown.
UNKNOWN_AGE = -1


def quantize(image: np.ndarray) -> np.ndarray:
    """Rounds a [0, 1] image to the stored ``uint16`` values."""
    return np.rint(np.clip(image, 0.0, 1.0) * IMAGE_MAX).astype("<u2")


def as_stored(image: np.ndarray) -> np.ndarray:
    """The image exactly as a record stores it (16-bit quantized), as float32.

    Scoring straight from DICOM passes images through this, so a file scored
    from DICOM and from its preprocessed shard gets the very same input.
    """
    return quantize(image).astype(np.float32) / IMAGE_MAX


def serialize(record: dict[str, Any]) -> bytes:
    """Serializes one image record to a ``tf.train.Example``.

    Args:
        record: ``image`` (float [0,1], or the stored ``uint16`` values from
            :func:`quantize`; shape ``IMAGE_SHAPE`` or 224x224),
            ``label`` (0/1 or bool), ``patient_id``, ``study_id``,
            ``dicom_path``, ``view_position``, ``sex`` (str, may be empty),
            ``age`` (int or None), ``original_rows``, ``original_columns``,
            optional ``sop_instance_uid`` and ``extra`` (dict of str -> str,
            the metadata.csv columns beyond the contract).

    Returns:
        The serialized proto.

    Raises:
        ValueError: when the image has the wrong shape.
    """
    image = np.asarray(record["image"])
    if image.shape not in (IMAGE_SHAPE, IMAGE_SHAPE[:2]):
        raise ValueError(f"image must be {IMAGE_SHAPE}, got {image.shape}")
    features: dict[str, Any] = {
        IMAGE: _bytes_feature(
            (image if image.dtype.kind == "u" and image.dtype.itemsize == 2 else quantize(image))
            .astype("<u2")
            .tobytes()
        ),
    }
    strings = {
        PATIENT_ID: record["patient_id"],
        STUDY_ID: record.get("study_id") or "",
        DICOM_PATH: record["dicom_path"],
        VIEW_POSITION: record.get("view_position") or "",
        SEX: record.get("sex") or "",
        SOP_INSTANCE_UID: record.get("sop_instance_uid") or "",
        EXTRA: json.dumps(record.get("extra") or {}, sort_keys=True),
    }
    for key, value in strings.items():
        features[key] = _bytes_feature(str(value).encode("utf-8"))
    age = record.get("age")
    ints = {
        LABEL: int(bool(record["label"])),
        AGE: UNKNOWN_AGE if age is None else int(age),
        ROWS: int(record["original_rows"]),
        COLUMNS: int(record["original_columns"]),
    }
    for key, value in ints.items():
        features[key] = example_proto.Feature(int64_list=example_proto.Int64List(value=[value]))
    example = example_proto.Example(features=example_proto.Features(feature=features))
    return example.SerializeToString(deterministic=True)


def _bytes_feature(value: bytes) -> Any:
    return example_proto.Feature(bytes_list=example_proto.BytesList(value=[value]))


def parse_example(serialized: bytes) -> dict[str, Any]:
    """Parses one serialized record into numpy / Python values.

    Returns:
        ``image`` float32 ``(224, 224, 1)`` in [0, 1]; ``label`` int 0/1;
        ``age`` int or None; ``original_rows``/``original_columns`` int;
        strings for ``patient_id``, ``study_id``, ``dicom_path``,
        ``view_position``, ``sex`` (``""`` when unknown) and
        ``sop_instance_uid``; ``extra`` dict of carried metadata columns.
    """
    example = example_proto.Example.FromString(serialized)
    feature = example.features.feature
    raw = feature[IMAGE].bytes_list.value[0]
    image = np.frombuffer(raw, dtype="<u2").reshape(IMAGE_SHAPE).astype(np.float32) / IMAGE_MAX
    out: dict[str, Any] = {"image": image}
    for key in STRING_FEATURES:
        out[key] = feature[key].bytes_list.value[0].decode("utf-8")
    for key in INT_FEATURES:
        out[key] = int(feature[key].int64_list.value[0])
    out["extra"] = json.loads(out.pop(EXTRA))
    out[AGE] = None if out[AGE] == UNKNOWN_AGE else out[AGE]
    return out
