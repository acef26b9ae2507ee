"""Fixtures for beam_pipelines tests: paths to the shared real data."""

from __future__ import annotations

from pathlib import Path

import pytest

from archive_tools import synth

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DICOM_CORPUS = SHARED_DATA / "dicom_corpus"

requires_corpus = pytest.mark.skipif(
    not (DICOM_CORPUS / "manifest.csv").exists(),
    reason="real DICOM corpus not found at ../shared/data/dicom_corpus",
)


@pytest.fixture(scope="session")
def synthetic_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic archive (24 patients, tiny images) with all 8 broken-row kinds."""
    root = tmp_path_factory.mktemp("archive") / "archive"
    synth.run(
        [
            "--output_dir",
            str(root),
            "--patients",
            "24",
            "--seed",
            "3",
            "--min_size",
            "48",
            "--max_size",
            "96",
            "--broken",
            "8",
            "--workers",
            "1",
        ]
    )
    return root


def output_files(root: Path) -> dict[str, bytes]:
    """Every file below root, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
