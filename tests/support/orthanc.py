"""A real PACS for the tests: Orthanc with its DICOMweb plugin, started on a free port.

:func:`orthanc_server` runs ``/usr/sbin/Orthanc`` with a configuration of its
own (never the system service or /etc/orthanc): localhost only, its storage
in the given folder, no DICOM listener, the DICOMweb plugin at
``/dicom-web/``. The test is skipped, with the reason, where Orthanc or the
plugin is not installed (Debian: ``orthanc orthanc-dicomweb``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.orthanc import OrthancServer, orthanc_missing

#: Every transfer syntax xray-synth writes, in one small archive (load_synthetic_archive).
MIXED_ENCODINGS = (
    "explicit_le:1,implicit_le:1,big_endian:1,deflate:1,rle:1,jpegls:1,j2k:1,jpeg_baseline:1"
)


@contextlib.contextmanager
def orthanc_server(folder: Path, users: dict[str, str] | None = None) -> Iterator[OrthancServer]:
    """A started Orthanc storing into ``folder``, killed on leaving; skips where absent.

    ``users`` (name -> password) turns HTTP basic authentication on.
    """
    missing = orthanc_missing()
    if missing:
        pytest.skip(missing)
    server = OrthancServer(folder, users)
    try:
        server.start()
        yield server
    finally:
        server.stop(graceful=False)  # its storage is the test's to throw away


def synthetic_archive(folder: Path, patients: int = 6, seed: int = 7) -> list[Path]:
    """A tiny synthetic archive (seed 7: every transfer syntax xray-synth writes); its files."""
    from archive_tools import synth

    root = folder / "archive"
    synth.run(
        ["--output_dir", str(root), "--patients", str(patients), "--seed", str(seed)]
        + ["--min_size", "64", "--max_size", "96", "--workers", "1"]
        + ["--encodings", MIXED_ENCODINGS]
    )
    return sorted((root / "raw").rglob("*.dcm"))


def load_synthetic_archive(server: OrthancServer, folder: Path, patients: int = 6) -> list[Path]:
    """Writes :func:`synthetic_archive` into ``folder`` and uploads every file; returns them."""
    paths = synthetic_archive(folder, patients)
    for path in paths:
        server.upload(path)
    return paths
