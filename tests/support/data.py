"""Where the repository and the shared real data are, and the mark for tests that need it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Real radiographs beside the project: <repo>/../shared/data.
SHARED_DATA = REPO.parent / "shared" / "data"
DICOM_CORPUS = SHARED_DATA / "dicom_corpus"

requires_corpus = pytest.mark.skipif(
    not (DICOM_CORPUS / "manifest.csv").exists(),
    reason="real DICOM corpus not found at ../shared/data/dicom_corpus",
)
