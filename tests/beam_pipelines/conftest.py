"""Fixtures for beam_pipelines tests: paths to the shared real data."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DICOM_CORPUS = SHARED_DATA / "dicom_corpus"

requires_corpus = pytest.mark.skipif(
    not (DICOM_CORPUS / "manifest.csv").exists(),
    reason="real DICOM corpus not found at ../shared/data/dicom_corpus",
)


def output_files(root: Path) -> dict[str, bytes]:
    """Every file below root, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
