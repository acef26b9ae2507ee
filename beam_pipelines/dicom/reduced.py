"""Decode a compressed frame at a reduced resolution, when the codec can.

A 2500x2048 radiograph becomes a 224x224 model input, so decoding every pixel
wastes most of the work. Two codecs can skip it:

* **JPEG 2000** (and HTJ2K) codestreams carry a wavelet resolution pyramid:
  OpenJPEG decodes level ``r`` (each side divided by ``2**r``, rounded up)
  without computing the finer levels. Reached through glymur, with the
  system's OpenJPEG (``libopenjp2``, 2.4 or newer) when glymur finds one, else
  the copy Pillow's wheel bundles (:func:`j2k_library`). Neither pylibjpeg-openjpeg
  nor imagecodecs expose the level, and Pillow's own ``reduce`` computes the
  reduced size by rounding instead of rounding up, so its decoder fails on
  half the image sizes.
* **JPEG baseline/extended, 8-bit**: libjpeg's scaled inverse DCT decodes at
  1/2, 1/4 or 1/8 scale (Pillow's ``draft``).

This module decodes stored values and decides when a frame qualifies
(:func:`decode_reduced`); :mod:`beam_pipelines.dicom.decoding` then applies
the same intensity pipeline and resize as the full path. A missing glymur or
OpenJPEG makes :func:`j2k_available` False (with one warning per process),
never an error. Nothing is looked up at import: the first J2K image decides.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import importlib.util
import io
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pydicom.encaps
from pydicom.dataset import Dataset

from beam_pipelines.dicom.header import GRAYSCALE, DicomHeader

logger = logging.getLogger(__name__)

# The pylibjpeg plugins and OpenJPEG decode HTJ2K with the same calls.
J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RCT
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
JPEG_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8-bit)
        "1.2.840.10008.1.2.4.51",  # JPEG Extended (8 or 12-bit; only 8 scales)
    }
)

_SOC_SIZ = b"\xff\x4f\xff\x51"


@dataclasses.dataclass(frozen=True)
class Codestream:
    """What a JPEG 2000 main header says about the image.

    Attributes:
        rows, columns: the full image size.
        row_offset, column_offset: the image origin on the reference grid.
        components: number of components.
        precision: bits per sample of component 0.
        signed: whether component 0 is signed.
        levels: wavelet decomposition levels available for component 0.
        tiles: number of tiles the image is cut into.
    """

    rows: int
    columns: int
    row_offset: int
    column_offset: int
    components: int
    precision: int
    signed: bool
    levels: int
    tiles: int = 1

    def shape_at(self, level: int) -> tuple[int, int]:
        """(rows, columns) OpenJPEG returns when decoding ``level``."""
        scale = 1 << level
        return (
            _ceil_div(self.row_offset + self.rows, scale) - _ceil_div(self.row_offset, scale),
            _ceil_div(self.column_offset + self.columns, scale)
            - _ceil_div(self.column_offset, scale),
        )

    def level_for(self, min_shape: tuple[int, int]) -> int:
        """The coarsest level whose size is still at least ``min_shape`` (0 = full)."""
        best = 0
        for level in range(1, self.levels + 1):
            rows, cols = self.shape_at(level)
            if rows < min_shape[0] or cols < min_shape[1]:
                break
            best = level
        return best


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def read_codestream(frame: bytes) -> Codestream | None:
    """Parses the SIZ and COD/COC markers of a J2K codestream (or a JP2 file's).

    Returns None when the bytes do not hold a well-formed main header; the
    full decoder then decides what is wrong.
    """
    start = frame.find(_SOC_SIZ, 0, 4096)  # JP2 boxes come before the codestream
    if start < 0:
        return None
    try:
        return _parse_main_header(memoryview(frame)[start:])
    except (IndexError, ValueError):
        return None


def _parse_main_header(data: memoryview) -> Codestream | None:
    def u16(at: int) -> int:
        return int.from_bytes(data[at : at + 2], "big")

    def u32(at: int) -> int:
        return int.from_bytes(data[at : at + 4], "big")

    # SOC, then the SIZ marker and its segment: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz,
    # YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz, then Ssiz per component.
    siz = 4  # Lsiz
    columns_end, rows_end = u32(siz + 4), u32(siz + 8)
    column_offset, row_offset = u32(siz + 12), u32(siz + 16)
    tile_columns, tile_rows = u32(siz + 20), u32(siz + 24)
    tile_column_offset, tile_row_offset = u32(siz + 28), u32(siz + 32)
    components = u16(siz + 36)
    if components < 1 or columns_end <= column_offset or rows_end <= row_offset:
        return None
    if not tile_columns or not tile_rows:
        return None
    tiles = _ceil_div(columns_end - tile_column_offset, tile_columns) * _ceil_div(
        rows_end - tile_row_offset, tile_rows
    )
    ssiz = data[siz + 38]
    precision, signed = (ssiz & 0x7F) + 1, bool(ssiz & 0x80)
    levels = None
    at = siz + u16(siz)  # the marker after the SIZ segment
    while at + 4 <= len(data):
        marker, length = u16(at), u16(at + 2)
        if marker == 0xFF90 or length < 2:  # SOT: the main header is over
            break
        if marker == 0xFF52:  # COD: default coding style
            cod_levels = data[at + 4 + 5]
            levels = cod_levels if levels is None else min(levels, cod_levels)
        elif marker == 0xFF53:  # COC: a component's own coding style
            wide = components >= 257
            component = u16(at + 4) if wide else data[at + 4]
            if component == 0:
                coc_levels = data[at + 4 + (2 if wide else 1) + 1]
                levels = coc_levels if levels is None else min(levels, coc_levels)
        at += 2 + length
    if levels is None:
        return None
    return Codestream(
        rows=rows_end - row_offset,
        columns=columns_end - column_offset,
        row_offset=row_offset,
        column_offset=column_offset,
        components=components,
        precision=precision,
        signed=signed,
        levels=levels,
        tiles=tiles,
    )


_JPEG_SOF = frozenset(range(0xFFC0, 0xFFD0)) - {0xFFC4, 0xFFC8, 0xFFCC} | {0xFFF7}


def frame_shape(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG, JPEG-LS or JPEG 2000 frame's own header declares.

    None when the header cannot be found; only the first 64 KiB are searched.
    """
    if frame[:4] == _SOC_SIZ or frame[4:8] == b"jP  ":
        info = read_codestream(frame)
        return (info.rows, info.columns) if info is not None else None
    if frame[:2] != b"\xff\xd8":  # JPEG SOI
        return None
    at, end = 2, min(len(frame), 1 << 16)
    while at + 9 <= end:
        if frame[at] != 0xFF:
            return None
        marker = int.from_bytes(frame[at : at + 2], "big")
        if marker in (0xFFD8, 0xFF01) or 0xFFD0 <= marker <= 0xFFD7 or marker == 0xFFFF:
            at += 1 if marker == 0xFFFF else 2  # no length: fill byte, SOI, TEM, RSTn
            continue
        if marker in _JPEG_SOF:
            rows = int.from_bytes(frame[at + 5 : at + 7], "big")
            cols = int.from_bytes(frame[at + 7 : at + 9], "big")
            # A height of 0 (left to a DNL marker) is returned as is: no DICOM
            # writer uses DNL, and libjpeg then allocates without bound.
            return (rows, cols)
        if marker == 0xFFDA:  # start of scan before any frame header
            return None
        at += 2 + int.from_bytes(frame[at + 2 : at + 4], "big")
    return None


# --------------------------------------------------------------------------
# JPEG 2000 through glymur

_lock = threading.Lock()
_j2k_state: dict[str, str | None] = {}

#: glymur 0.14 refuses to read with an OpenJPEG older than 2.4.0.
_MIN_OPENJPEG = (2, 4)
#: Where Pillow's wheels keep their OpenJPEG, relative to site-packages:
#: auditwheel's ``<dist>.libs`` (Linux; ``Pillow.libs`` before Pillow 11) and
#: delocate's ``PIL/.dylibs`` (macOS). The file names carry a hash and the version.
_PILLOW_OPENJPEG_GLOBS = (
    "pillow.libs/libopenjp2*.so*",
    "Pillow.libs/libopenjp2*.so*",
    "PIL/.dylibs/libopenjp2*.dylib",
)


def j2k_available() -> bool:
    """True when glymur and an OpenJPEG it can use are installed.

    Checked once per process, see :func:`j2k_library`; when False every J2K
    image takes the full path.
    """
    return j2k_library() is not None


def j2k_library() -> str | None:
    """The OpenJPEG library glymur decodes with, or None when there is none.

    The system's library when glymur finds one (2.4+), else the copy Pillow's
    wheel bundles, which glymur is then pointed at. Decided once per process,
    on the first call: one INFO line names the library, or one warning says
    what to install.
    """
    with _lock:
        if "library" not in _j2k_state:
            problem = _j2k_problem()
            library = None if problem is not None else _glymur_library()
            _j2k_state["library"] = library
            if library is not None:
                logger.info("JPEG 2000 images are decoded at reduced resolution with %s", library)
            else:
                logger.warning(
                    "JPEG 2000 images will be decoded at full resolution (slower): %s. "
                    "Install glymur and OpenJPEG 2.4+ (Debian/Ubuntu: apt-get install "
                    "libopenjp2-7; conda: openjpeg), or Pillow from its wheel, which bundles "
                    "libopenjp2, on every worker.",
                    problem,
                )
        return _j2k_state["library"]


def _j2k_problem() -> str | None:
    """None once glymur has an OpenJPEG 2.4+, else why not."""
    try:
        import glymur
    except Exception as exc:  # ImportError, or a broken install
        return f"glymur cannot be imported ({type(exc).__name__})"
    found = str(getattr(glymur.version, "openjpeg_version", "0.0.0"))
    if _version_tuple(found) >= _MIN_OPENJPEG:
        return None
    bundled = _pillow_openjpeg()
    if bundled is None:
        return (
            f"glymur found no OpenJPEG 2.4+ library (version {found}), nor does Pillow bundle one"
        )
    try:
        _point_glymur_at(bundled)
    except Exception as exc:
        return f"glymur cannot use Pillow's OpenJPEG {bundled} ({type(exc).__name__}: {exc})"
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return (0, 0)


def _library_version(path: str) -> str:
    """What ``opj_version()`` of the OpenJPEG library at ``path`` says."""
    library = ctypes.CDLL(path)
    library.opj_version.restype = ctypes.c_char_p
    return bytes(library.opj_version()).decode("ascii", "replace")


def _pillow_openjpeg() -> str | None:
    """The newest OpenJPEG 2.4+ Pillow's wheel bundles, or None (not found or too old)."""
    spec = importlib.util.find_spec("PIL")
    if spec is None or not spec.submodule_search_locations:
        return None
    site = Path(next(iter(spec.submodule_search_locations))).parent
    best: tuple[tuple[int, ...], str] | None = None
    for pattern in _PILLOW_OPENJPEG_GLOBS:
        for candidate in site.glob(pattern):
            try:
                version = _version_tuple(_library_version(str(candidate)))
            except (OSError, AttributeError):  # not loadable here, or not OpenJPEG
                continue
            if version >= _MIN_OPENJPEG and (best is None or version > best[0]):
                best = (version, str(candidate))
    return None if best is None else best[1]


def _point_glymur_at(path: str) -> None:
    """Has glymur load the OpenJPEG at ``path``, changing only glymur's own modules.

    glymur binds its library when ``glymur.lib.openjp2`` is imported and
    shapes its ctypes structures by that library's version, so setting
    ``OPENJP2`` afterwards is not enough: the module is re-executed (and
    ``glymur.version``, which records the version) while glymur's own lookup
    answers ``path``. Every other glymur module reaches both through the
    module object, which a reload keeps.
    """
    import glymur.config
    import glymur.lib.openjp2
    import glymur.version

    lookup = glymur.config._determine_full_path
    glymur.config._determine_full_path = lambda name: (
        Path(path) if name == "openjp2" else lookup(name)
    )
    try:
        importlib.reload(glymur.lib.openjp2)
        importlib.reload(glymur.version)
    finally:
        glymur.config._determine_full_path = lookup
    loaded = str(glymur.version.openjpeg_version)
    if _version_tuple(loaded) < _MIN_OPENJPEG:
        raise RuntimeError(f"glymur reports OpenJPEG {loaded}")


def _glymur_library() -> str:
    """The library glymur uses: its OpenJPEG version and path (or name)."""
    import glymur

    name = getattr(glymur.lib.openjp2.OPENJP2, "_name", "libopenjp2")
    return f"OpenJPEG {glymur.version.openjpeg_version} ({name})"


def _scratch_dir() -> str | None:
    # glymur reads only from files: a RAM-backed directory keeps that cheap.
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def decode_j2k_level(frame: bytes, level: int) -> np.ndarray:
    """Decodes resolution ``level`` of a J2K codestream (or JP2 file) to stored values.

    Raises:
        Exception: whatever glymur or OpenJPEG raise for a bad stream.
    """
    if not j2k_available():  # also points glymur at Pillow's OpenJPEG when needed
        raise RuntimeError("glymur has no OpenJPEG 2.4+ library to decode with")
    import glymur

    suffix = ".jp2" if frame[4:8] == b"jP  " else ".j2k"
    with tempfile.NamedTemporaryFile(suffix=suffix, dir=_scratch_dir()) as handle:
        handle.write(frame)
        handle.flush()
        with warnings.catch_warnings():
            # glymur warns about odd but readable boxes; the values decide.
            warnings.simplefilter("ignore")
            reader = glymur.Jp2kr(handle.name)
            step = 1 << level
            return np.asarray(reader[::step, ::step])


# --------------------------------------------------------------------------
# JPEG through Pillow's draft mode


def decode_jpeg_scaled(frame: bytes, min_shape: tuple[int, int]) -> tuple[np.ndarray, int] | None:
    """Decodes an 8-bit grayscale JPEG at the smallest DCT scale still >= ``min_shape``.

    Returns the uint8 stored values and the scale denominator (2, 4 or 8), or
    None when the frame is not 8-bit grayscale or no scaling fits.
    """
    from PIL import Image

    with Image.open(io.BytesIO(frame)) as image:
        if image.format != "JPEG" or image.mode != "L" or getattr(image, "bits", 8) != 8:
            return None
        full_cols, full_rows = image.size
        # draft() picks the smallest scale whose result is still >= the size asked.
        image.draft("L", (min_shape[1], min_shape[0]))
        cols, rows = image.size
        if (rows, cols) == (full_rows, full_cols):
            return None
        scale = round(full_cols / cols)
        return np.asarray(image), scale


# --------------------------------------------------------------------------
# The reduced decode routes


def decode_reduced(
    ds: Dataset, header: DicomHeader, keyword: str, min_shape: tuple[int, int]
) -> tuple[np.ndarray, str, int] | None:
    """Frame 0 at a reduced resolution >= ``min_shape``, or None for the full path.

    Only grayscale single-sample JPEG 2000 / 8-bit JPEG whose codestream
    agrees with the header qualify; anything the fast decoder refuses falls
    back to the full decoder, which then decodes or rejects it.
    """
    syntax = header.transfer_syntax_uid
    if (
        keyword != "PixelData"
        or header.samples_per_pixel != 1
        or header.photometric_interpretation not in GRAYSCALE
        or syntax not in J2K_SYNTAXES | JPEG_SYNTAXES
    ):
        return None
    try:
        frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=header.number_of_frames)
        if syntax in J2K_SYNTAXES:
            return _j2k_reduced(frame, header, min_shape)
        return _jpeg_scaled(frame, header, min_shape)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the full path decodes or rejects with a reason
        logger.debug("reduced decode refused (%s); decoding in full", type(exc).__name__)
        return None


def _j2k_reduced(
    frame: bytes, header: DicomHeader, min_shape: tuple[int, int]
) -> tuple[np.ndarray, str, int] | None:
    info = read_codestream(frame)
    if (
        info is None
        or info.components != 1
        or (info.rows, info.columns) != (header.rows, header.columns)
        # A codestream that disagrees with the header gets pydicom's handling.
        or info.precision != header.bits_stored
        or info.signed != (header.pixel_representation == 1)
    ):
        return None
    level = info.level_for(min_shape)
    if level == 0 or not j2k_available():
        return None
    stored = decode_j2k_level(frame, level)
    if stored.shape != info.shape_at(level) or stored.dtype.kind not in "iu":
        return None
    return stored, "j2k_reduced", 1 << level


def _jpeg_scaled(
    frame: bytes, header: DicomHeader, min_shape: tuple[int, int]
) -> tuple[np.ndarray, str, int] | None:
    if header.bits_allocated != 8 or header.pixel_representation != 0:
        return None
    scaled = decode_jpeg_scaled(frame, min_shape)
    if scaled is None:
        return None
    stored, scale = scaled
    expected = (-(-header.rows // scale), -(-header.columns // scale))
    if stored.shape != expected:
        return None
    return stored, "jpeg_scaled", scale
