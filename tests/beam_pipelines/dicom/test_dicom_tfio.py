"""Cross-check beam_pipelines.dicom against tensorflow-io's DCMTK decoder.

tensorflow-io's ``decode_dicom_image`` is an independent implementation
(DCMTK). Its documented differences: it ignores our VOI policy (we compare
with ``voi_index=None``), returns display values (MONOCHROME1 already
inverted) scaled to its own range, burns overlay planes into the pixels, and
returns zeros for syntaxes it cannot decode. Its output must therefore be a
linear function of ours: correlation ~1. We scale by the bit range here
(``range_source="bit_range"``): the image range clips the 0.5% tails, which
no linear function of DCMTK's output reproduces.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from beam_pipelines.dicom import DecodeOptions, decode, read_dataset
from tests.support.data import DICOM_CORPUS, requires_corpus

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
tfio = pytest.importorskip("tensorflow_io")


def test_tensorflow_io_ops_load_with_pinned_tensorflow() -> None:
    """The pin's reason: tensorflow-io's DICOM op must load on this TensorFlow."""
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    image = tfio.image.decode_dicom_image(data, on_error="strict", dtype=tf.uint16)
    assert tuple(image.shape) == (1, 64, 64, 1)
    assert int(tf.reduce_max(image)) > 0


def _has_overlay(path: str) -> bool:
    ds = read_dataset(path)
    return any((element.tag.group & 0xFF00) == 0x6000 for element in ds)


@requires_corpus
def test_grayscale_corpus_matches_dcmtk() -> None:
    with (DICOM_CORPUS / "manifest.csv").open(newline="") as handle:
        rows = [
            row
            for row in csv.DictReader(handle)
            if row["decode_pydicom_pylibjpeg_gdcm"].startswith("ok")
            and row["photometric"] in ("MONOCHROME1", "MONOCHROME2")
        ]
    compared, disagreements = 0, []
    for row in rows:
        path = str(DICOM_CORPUS / row["path"])
        data = Path(path).read_bytes()
        try:
            theirs = tfio.image.decode_dicom_image(
                data, on_error="strict", scale="preserve", dtype=tf.uint16
            ).numpy()[0, ..., 0]
        except tf.errors.OpError:
            continue  # a syntax DCMTK in tensorflow-io does not decode
        ours = decode(data, DecodeOptions(voi_index=None, range_source="bit_range")).image
        if theirs.shape != ours.shape or theirs.std() == 0 or ours.std() == 0:
            continue  # tensorflow-io returned its "could not decode" zeros
        if _has_overlay(path):
            continue  # DCMTK burns overlays into the pixels; we do not
        compared += 1
        correlation = np.corrcoef(theirs.ravel().astype(np.float64), ours.ravel())[0, 1]
        if correlation < 0.999:
            disagreements.append((row["path"], round(float(correlation), 4)))
    assert compared >= 60, f"only {compared} files compared"
    assert not disagreements, disagreements
