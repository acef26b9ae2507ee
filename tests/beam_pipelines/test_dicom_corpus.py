"""beam_pipelines.dicom on 225 real DICOM files of many kinds (../shared/data/dicom_corpus).

The corpus manifest says which files pydicom with the pylibjpeg plugins and
GDCM decodes. Every decodable grayscale file must decode; every other file
must decode correctly or be rejected with a reason; nothing may crash or hang.
"""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest

from beam_pipelines.dicom import REJECT_REASONS, DicomRejected, decode
from tests.beam_pipelines.conftest import DICOM_CORPUS, requires_corpus

pytestmark = [requires_corpus, pytest.mark.real_data]


def _manifest() -> list[dict[str, str]]:
    path = DICOM_CORPUS / "manifest.csv"
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


ROWS = _manifest()


@pytest.mark.parametrize("row", ROWS, ids=[row["path"] for row in ROWS])
def test_corpus_file_decodes_or_is_rejected_with_reason(row: dict[str, str]) -> None:
    grayscale = row["photometric"] in ("MONOCHROME1", "MONOCHROME2")
    decodable = row["decode_pydicom_pylibjpeg_gdcm"].startswith("ok")
    started = time.perf_counter()
    try:
        result = decode(str(DICOM_CORPUS / row["path"]))
    except DicomRejected as rejected:
        assert rejected.reason in REJECT_REASONS
        assert not (grayscale and decodable), f"decodable grayscale file rejected: {rejected}"
        if decodable:  # a decodable colour file: rejected only for being colour
            assert rejected.reason == "unsupported_photometric"
    else:
        image = result.image
        assert image.dtype == np.float32 and image.ndim == 2
        assert image.shape == (int(row["rows"]), int(row["cols"]))
        assert np.isfinite(image).all()
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert result.inverted == (row["photometric"] == "MONOCHROME1")
    assert time.perf_counter() - started < 30, "decode took too long"


def test_corpus_radiographs_all_decode() -> None:
    """The real radiographs (CR/DX/RG/MG) that any decoder handles all come out."""
    radiographs = [
        row
        for row in ROWS
        if row["modality"] in ("CR", "DX", "RG", "MG")
        and row["decode_pydicom_pylibjpeg_gdcm"].startswith("ok")
    ]
    assert len(radiographs) >= 15
    for row in radiographs:
        image = decode(str(DICOM_CORPUS / row["path"])).image
        # A real radiograph uses a good part of the display range.
        assert image.std() > 0.02, row["path"]


def test_raw_dataset_without_part10_header_decodes() -> None:
    """fo-dicom's CR-MONO1-10-chest has no preamble or file meta (old archives)."""
    result = decode(str(DICOM_CORPUS / "fo-dicom" / "CR-MONO1-10-chest"))
    assert result.inverted
    assert result.image.shape == (440, 440)
    assert result.image.std() > 0.05
