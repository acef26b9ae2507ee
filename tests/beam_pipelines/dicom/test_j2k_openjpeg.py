"""Which OpenJPEG the JPEG 2000 fast path uses: the system's, else the copy Pillow's wheel bundles.

The machine running the tests may have a system ``libopenjp2``; each test
below runs a child Python in which glymur cannot find it (``find_library``
answers None for it, and no ``glymurrc`` is in reach), as on a machine
without the system package.
"""

from __future__ import annotations

import ctypes.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from archive_tools.dicom_writer import PixelFormat, RadiographHeader, to_stored, write_dicom
from archive_tools.phantom import chest_phantom
from beam_pipelines.dicom import DecodeOptions, decode_model_input, reduced
from tests.support.data import REPO

glymur = pytest.importorskip("glymur")

# The child: glymur finds no system OpenJPEG; then decode one file and report.
_CHILD = """
import ctypes.util, json, sys
_find = ctypes.util.find_library
ctypes.util.find_library = lambda name: None if name == "openjp2" else _find(name)
import glymur
import numpy as np
from beam_pipelines.dicom import decode_model_input, reduced
if sys.argv[3] == "no-bundled-copy":
    reduced._PILLOW_OPENJPEG_GLOBS = ()
found = glymur.version.openjpeg_version
image, decoded = decode_model_input(sys.argv[1])
np.save(sys.argv[2], image)
print(json.dumps({"glymur_found": found, "route": decoded.route, "library": reduced.j2k_library()}))
"""


def _j2k_radiograph(path: Path) -> bytes:
    fmt = PixelFormat(bits_stored=12)
    display = chest_phantom(np.random.default_rng(3), 1000, 800, abnormal=True)
    buffer = io.BytesIO()
    write_dicom(
        buffer,
        to_stored(display, fmt),
        fmt,
        "j2k",
        RadiographHeader(patient_id="P1", study_id="S1"),
    )
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _decode_without_system_openjpeg(
    tmp_path: Path, mode: str
) -> tuple[dict[str, str | None], np.ndarray, str]:
    source, output = tmp_path / "image.dcm", tmp_path / "image.npy"
    _j2k_radiograph(source)
    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_CONFIG_HOME=str(tmp_path))
    # glymur reads a glymurrc in the working directory or XDG_CONFIG_HOME/glymur: none there.
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(source), str(output), mode],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["glymur_found"] == "0.0.0"  # the system library is really out of reach
    return report, np.load(output), done.stderr


def test_bundled_openjpeg_gives_the_reduced_path_without_a_system_library(
    tmp_path: Path,
) -> None:
    bundled = reduced._pillow_openjpeg()
    if bundled is None:
        pytest.skip("this Pillow bundles no OpenJPEG 2.4+ (not installed from its wheel)")
    report, image, _ = _decode_without_system_openjpeg(tmp_path, "bundled-copy")
    assert report["route"] == "j2k_reduced"
    library = report["library"]
    assert library is not None and f"({bundled})" in library
    # The same pixels as this process decodes, with the system library if it has one.
    data = (tmp_path / "image.dcm").read_bytes()
    here, decoded = decode_model_input(data)
    assert decoded.route == "j2k_reduced"
    assert np.array_equal(image, here)  # lossless J2K: levels are exact integers
    full, _ = decode_model_input(data, DecodeOptions(reduced_resolution=False))
    assert float(np.corrcoef(image.ravel(), full.ravel())[0, 1]) >= 0.995


def test_without_any_openjpeg_the_full_path_and_one_warning(tmp_path: Path) -> None:
    report, image, log = _decode_without_system_openjpeg(tmp_path, "no-bundled-copy")
    assert report["route"] == "full" and report["library"] is None
    warnings = [line for line in log.splitlines() if "decoded at full resolution" in line]
    assert len(warnings) == 1 and "libopenjp2" in warnings[0]
    data = (tmp_path / "image.dcm").read_bytes()
    full, _ = decode_model_input(data, DecodeOptions(reduced_resolution=False))
    assert np.array_equal(image, full)


def test_the_system_library_wins_when_glymur_finds_one() -> None:
    system = ctypes.util.find_library("openjp2")
    if system is None:
        pytest.skip("no system OpenJPEG on this machine")
    if reduced._version_tuple(reduced._library_version(system)) < reduced._MIN_OPENJPEG:
        pytest.skip(f"the system OpenJPEG ({system}) is older than 2.4")
    library = reduced.j2k_library()
    assert library is not None and f"({system})" in library
