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

from beam_pipelines.dicom import REJECT_REASONS, DecodeOptions, DicomRejected, decode
from tests.support.data import DICOM_CORPUS, requires_corpus

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


def test_image_range_leaves_windowed_files_alone_and_lifts_the_rest() -> None:
    """The image range (no VOI) against the bit range, over every decodable grayscale file.

    Windowed files are bit-identical; the others get a header or percentile
    range, inside the bit range, so they never lose contrast (clipping the
    0.5% tails may cost a little) and the near-flat ones gain it.
    """
    bit_range = DecodeOptions(range_source="bit_range")
    modes: dict[str, int] = {}
    lifted = 0
    for row in ROWS:
        if row["photometric"] not in ("MONOCHROME1", "MONOCHROME2"):
            continue
        path = str(DICOM_CORPUS / row["path"])
        try:
            new = decode(path)
        except DicomRejected:
            continue
        old = decode(path, bit_range)
        modes[new.intensity_source] = modes.get(new.intensity_source, 0) + 1
        if new.intensity_source in ("window", "voi_lut", "min_max"):
            assert old.intensity_source == new.intensity_source and np.array_equal(
                new.image, old.image
            ), row["path"]
            continue
        assert new.intensity_source in ("image_range", "percentiles", "window_ignored"), row["path"]
        assert old.intensity_source in ("bit_range", "window_ignored"), row["path"]
        assert new.image.std() >= 0.95 * old.image.std(), row["path"]
        lifted += new.image.std() > 2 * old.image.std() + 0.01
    # When written: 52 with a window or VOI LUT; 65 by percentiles (CT, MR,
    # NM, PT, SEG without a window), 1 by the header range, 1 window ignored;
    # 26 of those more than doubled their contrast.
    assert modes.get("percentiles", 0) >= 50 and modes.get("image_range", 0) >= 1
    assert lifted >= 20
