"""Fuzzing the DICOM decoder: mutated files may only ever raise DicomRejected.

Seeds are small valid files from :mod:`archive_tools.dicom_writer`, one or
two per encoding, plus two 448x464 JPEG 2000 / JPEG files large enough for
:func:`decode_model_input` to take its reduced-resolution paths. Each test
mutates them one way (truncation, bit flips, byte overwrites, lying lengths,
hostile header values, wrong VRs, inserted elements, a mangled fragment
table, a lying codestream header, or a stack of several) and checks the
contract of :func:`read_image` and :func:`decode_model_input`: a finite
float32 image in [0, 1] of the right shape, or :class:`DicomRejected` with a
known reason, within a time and memory bound per file.

Each Hypothesis test runs in a forked child of pytest (POSIX), so a codec
that kills its process fails that test, naming the input, instead of ending
the session. Per example, time is bounded by a wall-clock check and a
SIGALRM guard (faulthandler ends a child hung inside C code); memory by a
small ``max_pixels``, a check of the peak-RSS growth (C allocators
included) and, as a safety net for the machine, an address-space limit on
the child. Failing inputs are saved under ``$TMPDIR/dicom_fuzz_failures``.

Runs are derandomized so CI sees the same examples every time. A local
campaign sets ``DICOM_FUZZ_EXAMPLES`` (e.g. 10000), which also switches to
fresh random examples on each run.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import functools
import io
import os
import resource
import signal
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Literal, NoReturn

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive_tools.dicom_writer import PixelFormat, RadiographHeader, to_stored, write_dicom
from archive_tools.phantom import chest_phantom
from beam_pipelines.dicom import (
    MODEL_INPUT_SIZE,
    REJECT_REASONS,
    DecodeOptions,
    DicomRejected,
    decode_model_input,
    read_image,
    reduced,
)

# --------------------------------------------------------------------------
# Budget

_CAMPAIGN = "DICOM_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(
    max_examples=int(os.environ.get("DICOM_FUZZ_EXAMPLES", "200")),
    derandomize=not _CAMPAIGN,
    database=None,
    # Time is bounded by check_contract itself (_SLOW_SECONDS), which also
    # stops a child whose state a runaway decode has ruined.
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=False,
)
# A seed decodes in 5-100 ms; seconds mean a pathological input (the
# margin absorbs a loaded CI machine).
_SLOW_SECONDS = 5.0
# SIGALRM turns a Python-level hang into a failure; faulthandler ends the
# process (with every thread's traceback) if a codec hangs inside C code.
_HANG_SECONDS = 10
_HARD_HANG_SECONDS = 60
# Memory, measured per example as the growth of peak RSS (all allocators,
# C codecs included): a legitimate decode under FUZZ_OPTIONS needs under
# 30 MB, one that sizes buffers from an unchecked value needs far more.
_MAX_RSS_GROWTH = 256 << 20
# Address space a child may add to what it holds after warming up: a safety
# net for the machine (a bug can ask for tens of GB). Allocations beyond it
# fail, which codecs report as an ordinary decode error; the RSS bound above
# is what detects them.
_MEMORY_HEADROOM = 2 << 30

# The largest seed has 448x464 pixels; anything much larger is refused
# before a buffer is sized from the header.
_MAX_PIXELS = 1 << 19
FUZZ_OPTIONS = DecodeOptions(max_pixels=_MAX_PIXELS, max_file_bytes=1 << 22)
OPTION_VARIANTS = (
    FUZZ_OPTIONS,
    dataclasses.replace(FUZZ_OPTIONS, voi_index=None),
    dataclasses.replace(FUZZ_OPTIONS, voi_index=1, multiframe="reject"),
    dataclasses.replace(FUZZ_OPTIONS, color="luminance"),
    dataclasses.replace(FUZZ_OPTIONS, color="reject", reduced_resolution=False),
)

# --------------------------------------------------------------------------
# Seeds

HEADER = RadiographHeader(
    patient_id="P000001",
    study_id="S0001",
    patient_age=65,
    patient_sex="F",
    patient_name="SYNTH^P000001",
)


@dataclasses.dataclass(frozen=True)
class SeedSpec:
    encoding: str
    rows: int
    cols: int
    fmt: PixelFormat


_12BIT = PixelFormat(bits_stored=12)
_8BIT = PixelFormat(bits_stored=8)
_SIGNED_MONO1 = PixelFormat(
    bits_stored=16,
    photometric="MONOCHROME1",
    signed=True,
    rescale_slope=0.5,
    rescale_intercept=-1024.0,
    window_center=0.0,
    window_width=8000.0,
)
SEEDS: dict[str, SeedSpec] = {
    "explicit_le_12": SeedSpec("explicit_le", 24, 16, _12BIT),
    "explicit_le_signed": SeedSpec("explicit_le", 48, 64, _SIGNED_MONO1),
    "implicit_le_8_odd": SeedSpec("implicit_le", 17, 33, _8BIT),
    "big_endian_12": SeedSpec("big_endian", 24, 16, _12BIT),
    "big_endian_signed": SeedSpec("big_endian", 20, 30, _SIGNED_MONO1),
    "deflate_12": SeedSpec("deflate", 24, 16, _12BIT),
    "rle_12": SeedSpec("rle", 24, 16, _12BIT),
    "rle_8_odd": SeedSpec("rle", 19, 25, _8BIT),
    "jpegls_12": SeedSpec("jpegls", 24, 16, _12BIT),
    # OpenJPEG needs at least 32 pixels a side for its default 5 levels.
    "j2k_12": SeedSpec("j2k", 32, 40, _12BIT),
    "j2k_signed": SeedSpec("j2k", 48, 64, _SIGNED_MONO1),
    "jpeg_baseline_8": SeedSpec("jpeg_baseline", 24, 16, _8BIT),
    # Twice the model input a side: the reduced-resolution decoders engage.
    "j2k_reduced": SeedSpec("j2k", 448, 464, _8BIT),
    "jpeg_scaled": SeedSpec("jpeg_baseline", 448, 464, _8BIT),
}
_COMPRESSED = ("rle", "jpegls", "j2k", "jpeg_baseline")
_ENCAPSULATED = tuple(name for name, spec in SEEDS.items() if spec.encoding in _COMPRESSED)

_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_ALL_VRS = sorted(
    _LONG_VRS
    | {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "PN", "SH"}
    | {"SL", "SS", "ST", "TM", "UI", "UL", "US"}
)
ByteOrder = Literal["little", "big"]
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


@dataclasses.dataclass(frozen=True)
class Element:
    """Where one top-level element sits in its part of the file."""

    tag: int
    vr: str | None
    start: int
    length_at: int
    length_size: int
    value_start: int
    end: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """A seed split into its file meta and data set, with element offsets.

    ``body`` is the data set as the parser sees it: inflated for the deflate
    syntax, so edits land on elements and :meth:`assemble` deflates again.
    """

    meta: bytes
    body: bytes
    explicit: bool
    little: bool
    deflated: bool
    meta_elements: tuple[Element, ...]
    body_elements: tuple[Element, ...]

    @property
    def order(self) -> ByteOrder:
        return "little" if self.little else "big"

    def element(self, tag: int) -> Element | None:
        return next((e for e in self.body_elements if e.tag == tag), None)

    def assemble(self, meta: bytes | None = None, body: bytes | None = None) -> bytes:
        body = self.body if body is None else body
        if self.deflated:
            packer = zlib.compressobj(6, zlib.DEFLATED, -15)
            body = packer.compress(body) + packer.flush()
        return (self.meta if meta is None else meta) + body


@dataclasses.dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    layout: Layout

    @property
    def pixel_start(self) -> int:
        """Offset of the pixel data value in the file (the compressed body's start if deflated)."""
        if self.layout.deflated:
            return len(self.layout.meta)
        pixel = self.layout.element(0x7FE00010)
        assert pixel is not None
        return len(self.layout.meta) + pixel.value_start


def _scan(
    data: bytes, pos: int, explicit: bool, little: bool, group: int | None = None
) -> list[Element]:
    """Top-level elements from ``pos`` (the seeds hold no sequences)."""
    order: ByteOrder = "little" if little else "big"
    elements = []
    while pos + 8 <= len(data):
        tag = (int.from_bytes(data[pos : pos + 2], order) << 16) | int.from_bytes(
            data[pos + 2 : pos + 4], order
        )
        if group is not None and tag >> 16 != group:
            break
        vr: str | None = None
        if explicit:
            vr = data[pos + 4 : pos + 6].decode("ascii")
            length_at, size = (pos + 8, 4) if vr in _LONG_VRS else (pos + 6, 2)
        else:
            length_at, size = pos + 4, 4
        length = int.from_bytes(data[length_at : length_at + size], order)
        value_start = length_at + size
        # Only Pixel Data has an undefined length here: it ends after its delimiter.
        undefined = length == _UNDEFINED
        end = _items(data, value_start)[-1][0] + 8 if undefined else value_start + length
        elements.append(Element(tag, vr, pos, length_at, size, value_start, end))
        pos = end
    return elements


def _items(data: bytes, pos: int) -> list[tuple[int, int, int]]:
    """(offset, tag, length) of each encapsulated item, the sequence delimiter last."""
    items = []
    while pos + 8 <= len(data):
        tag = (int.from_bytes(data[pos : pos + 2], "little") << 16) | int.from_bytes(
            data[pos + 2 : pos + 4], "little"
        )
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        items.append((pos, tag, length))
        if tag == _SEQUENCE_END:
            break
        pos += 8 + length
    return items


def _layout(data: bytes) -> Layout:
    meta_elements = _scan(data, 132, explicit=True, little=True, group=0x0002)
    meta_end = meta_elements[-1].end
    syntax_element = next(e for e in meta_elements if e.tag == 0x00020010)
    syntax = pydicom.uid.UID(
        data[syntax_element.value_start : syntax_element.end].rstrip(b"\0 ").decode()
    )
    deflated = syntax == pydicom.uid.DeflatedExplicitVRLittleEndian
    body = data[meta_end:]
    if deflated:
        body = zlib.decompressobj(-15).decompress(body)
    explicit, little = not syntax.is_implicit_VR, syntax.is_little_endian
    return Layout(
        meta=data[:meta_end],
        body=body,
        explicit=explicit,
        little=little,
        deflated=deflated,
        meta_elements=tuple(meta_elements),
        body_elements=tuple(_scan(body, 0, explicit, little)),
    )


@functools.cache
def _seed(name: str) -> Seed:
    spec = SEEDS[name]
    rng = np.random.default_rng(sorted(SEEDS).index(name))
    display = chest_phantom(rng, spec.rows, spec.cols, abnormal=True)
    buffer = io.BytesIO()
    write_dicom(buffer, to_stored(display, spec.fmt), spec.fmt, spec.encoding, HEADER)
    data = buffer.getvalue()
    return Seed(name, data, _layout(data))


# --------------------------------------------------------------------------
# Cases and the contract


class Case:
    """One mutated file; the repr names the seed and the edit, not the bytes."""

    __slots__ = ("data", "mutation", "seed")

    def __init__(self, seed: str, mutation: str, data: bytes) -> None:
        self.seed, self.mutation, self.data = seed, mutation, data

    def __repr__(self) -> str:
        # crc32, not hashlib: it still works when a codec has eaten all memory.
        digest = zlib.crc32(self.data)
        return f"Case({self.seed}: {self.mutation}; {len(self.data)} bytes, crc32 {digest:08x})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Hypothesis prints falsifying examples with its pretty printer.
        printer.text(repr(self))


# Failing (and, in a child, current) inputs are kept here to reproduce by hand.
FAILURES = Path(tempfile.gettempdir()) / "dicom_fuzz_failures"


def _test_name() -> str:
    current = os.environ.get("PYTEST_CURRENT_TEST", "dicom_fuzz")
    return current.split(" ")[0].split("::")[-1]


def _save(case: Case, suffix: str) -> Path:
    path = FAILURES / f"{_test_name()}.{suffix}.dcm"
    try:
        FAILURES.mkdir(exist_ok=True)
        path.write_bytes(case.data)
    except (OSError, MemoryError):  # a report without the file beats none
        pass
    return path


class DecodeHang(BaseException):
    """Raised by SIGALRM; a BaseException so the decoder's handlers cannot swallow it."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise DecodeHang(f"decode still running after {_HANG_SECONDS} s")


@contextmanager
def _time_guard() -> Iterator[None]:
    main = threading.current_thread() is threading.main_thread()
    use_alarm = hasattr(signal, "setitimer") and main
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, _HANG_SECONDS)
    faulthandler.dump_traceback_later(_HARD_HANG_SECONDS, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _check_image(image: np.ndarray, shape: tuple[int, ...] | None, ndim: int) -> None:
    assert isinstance(image, np.ndarray), type(image)
    assert image.dtype == np.float32, image.dtype
    assert image.ndim == ndim, image.shape
    assert min(image.shape) >= 1, image.shape
    if shape is not None:
        assert image.shape == shape, image.shape
    assert np.isfinite(image).all(), "non-finite pixels"
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0, (image.min(), image.max())


class _ResourceEscape(Exception):
    """Too slow, too much memory: fatal for a child, whose state may be ruined."""


def _rejected_or(call: Callable[[], None], what: str) -> None:
    try:
        call()
    except DicomRejected as exc:
        assert exc.reason in REJECT_REASONS, exc.reason
    except (KeyboardInterrupt, SystemExit):
        raise
    except (MemoryError, DecodeHang) as exc:
        raise _ResourceEscape(f"{what}: {type(exc).__name__} {exc}") from exc
    except AssertionError as exc:
        raise AssertionError(f"{what} returned a bad image: {exc}") from exc
    except BaseException as exc:
        # Hypothesis shrinks AssertionErrors; other BaseExceptions (a Rust
        # panic is one) would pass through unshrunk.
        name = f"{type(exc).__module__}.{type(exc).__name__}"
        raise AssertionError(f"{what}: {name} escaped: {exc}") from exc


def check_contract(case: Case, options: DecodeOptions = FUZZ_OPTIONS) -> None:
    """The decoder's promise for any bytes: a [0, 1] image, or DicomRejected.

    Each call takes under _SLOW_SECONDS and _MAX_RSS_GROWTH of memory.
    """

    def full() -> None:
        _check_image(read_image(case.data, options), None, ndim=2)

    def model_input() -> None:
        array, decoded = decode_model_input(case.data, options)
        _check_image(array, (MODEL_INPUT_SIZE, MODEL_INPUT_SIZE, 1), ndim=3)
        _check_image(decoded.image, None, ndim=2)

    if _CHILD_REPORT is not None:
        _save(case, "current")  # what the parent reports if this process dies
    rss = _reset_peak_rss()
    start = time.perf_counter()
    try:
        with _time_guard():
            _rejected_or(full, "read_image")
            _rejected_or(model_input, "decode_model_input")
        seconds = time.perf_counter() - start
        if seconds > _SLOW_SECONDS:
            raise _ResourceEscape(f"decoding took {seconds:.1f} s (bound {_SLOW_SECONDS} s)")
        growth = 0 if rss is None else _peak_rss() - rss
        if growth > _MAX_RSS_GROWTH:
            bound = _MAX_RSS_GROWTH >> 20
            raise _ResourceEscape(f"decoding took {growth >> 20} MiB (bound {bound} MiB)")
    except (_ResourceEscape, MemoryError) as exc:
        _fatal(case, exc)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; input saved to {_save(case, 'failing')}") from exc


def _fatal(case: Case, problem: BaseException) -> NoReturn:
    """Ends a child on a time or memory escape; in-process, fails the example."""
    try:
        message = f"{case!r}: {problem}; input saved to {_save(case, 'failing')}"
    except BaseException:  # memory a codec kept can break even this
        message = f"{case.seed}: {case.mutation}: {type(problem).__name__}"
    if _CHILD_REPORT is not None:
        # Memory a codec did not give back, a signal handler left mid-way:
        # later examples in this process would fail for the wrong reason.
        os.write(_CHILD_REPORT, message.encode(errors="replace"))
        os._exit(3)
    raise AssertionError(message) from problem


def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> int | None:
    """Resets the peak-RSS mark (Linux >= 4.0); returns the current RSS, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return _peak_rss()
    except (OSError, StopIteration):
        return None


def _limit_memory() -> None:
    """Caps this process's address space a little above what it uses (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    with open("/proc/self/statm") as statm:
        in_use = int(statm.read().split()[0]) * resource.getpagesize()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = in_use + _MEMORY_HEADROOM
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


# In a child: the pipe to report a fatal problem through.
_CHILD_REPORT: int | None = None


def in_child(test: Callable[[], None]) -> Callable[[], None]:
    """Runs a Hypothesis test in a forked child of pytest.

    Some codecs abort the whole process on bad input (GDCM throws C++
    exceptions nobody catches) or keep memory they failed with: in a child
    that fails this one test, naming the input, instead of ending or
    poisoning the session. The child also carries the address-space limit,
    so pytest's own is never touched. Without fork (Windows) the test runs
    in-process.
    """

    def run() -> None:
        if hasattr(os, "fork"):
            _run_in_child(test)
        else:
            test()

    run.__name__ = run.__qualname__ = test.__name__
    run.__doc__ = test.__doc__
    return run


def _run_in_child(test: Callable[[], None]) -> None:
    global _CHILD_REPORT
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child reports through the pipe and never returns into pytest
        status = 0
        try:
            os.close(read_end)
            _CHILD_REPORT = write_end
            _limit_memory()
            test()
        except BaseException:
            status = 1
            os.write(write_end, traceback.format_exc().encode(errors="replace"))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    current = FAILURES / f"{_test_name()}.current.dcm"
    if os.WIFSIGNALED(status) or (os.WEXITSTATUS(status) != 0 and not report):
        crashed = FAILURES / f"{_test_name()}.crash.dcm"
        if current.exists():
            current.replace(crashed)
        how = (
            f"signal {signal.Signals(os.WTERMSIG(status)).name}"
            if os.WIFSIGNALED(status)
            else f"exit status {os.WEXITSTATUS(status)}"
        )
        pytest.fail(f"the decoder ended the process ({how}); input saved to {crashed}")
    current.unlink(missing_ok=True)
    if os.WEXITSTATUS(status) != 0:
        pytest.fail(report, pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def _warm_codecs() -> None:
    """Loads every codec once before fuzzing, so children inherit them and their limit."""
    for name in SEEDS:
        check_contract(Case(name, "unchanged", _seed(name).data))


# --------------------------------------------------------------------------
# Mutations

seed_names = st.sampled_from(sorted(SEEDS))
options = st.sampled_from(OPTION_VARIANTS)


def _u(value: int, size: int, order: ByteOrder) -> bytes:
    return (value % (1 << (8 * size))).to_bytes(size, order)


def _encode_element(tag: int, vr: str, value: bytes, explicit: bool, order: ByteOrder) -> bytes:
    """One element as the syntax writes it (value taken as given, even if odd or wrong)."""
    head = _u(tag >> 16, 2, order) + _u(tag, 2, order)
    if not explicit:
        return head + _u(len(value), 4, order) + value
    vr_bytes = vr.encode("latin-1")[:2].ljust(2, b" ")
    if vr in _LONG_VRS:
        return head + vr_bytes + b"\0\0" + _u(len(value), 4, order) + value
    return head + vr_bytes + _u(len(value), 2, order) + value


def _splice(data: bytes, start: int, end: int, new: bytes) -> bytes:
    return data[:start] + new + data[end:]


@st.composite
def truncated(draw: st.DrawFn) -> Case:
    """The file cut at any offset, often near an element boundary."""
    seed = _seed(draw(seed_names))
    boundaries = [e.start for e in seed.layout.meta_elements] + [128, 132, seed.pixel_start]
    if not seed.layout.deflated:  # a deflated body's offsets are not file offsets
        boundaries += [len(seed.layout.meta) + e.start for e in seed.layout.body_elements]
    near = st.builds(lambda b, d: max(0, b + d), st.sampled_from(boundaries), st.integers(-9, 9))
    cut = draw(st.integers(0, len(seed.data) - 1) | near)
    return Case(seed.name, f"truncated at {cut}", seed.data[:cut])


_REGIONS = ("anywhere", "header", "pixels")


def _region(seed: Seed, region: str) -> tuple[int, int]:
    if region == "header":
        return 0, seed.pixel_start
    if region == "pixels":
        return seed.pixel_start, len(seed.data)
    return 0, len(seed.data)


@st.composite
def bit_flips(draw: st.DrawFn) -> Case:
    """1-16 flipped bits, anywhere, in the header or in the pixel data."""
    seed = _seed(draw(seed_names))
    region = draw(st.sampled_from(_REGIONS))
    lo, hi = _region(seed, region)
    flips = draw(
        st.lists(st.tuples(st.integers(lo, hi - 1), st.integers(0, 7)), min_size=1, max_size=16)
    )
    data = bytearray(seed.data)
    for at, bit in flips:
        data[at] ^= 1 << bit
    return Case(seed.name, f"{region} bit flips {flips}", bytes(data))


@st.composite
def byte_overwrites(draw: st.DrawFn) -> Case:
    """1-4 runs of random (often extreme) bytes written over the file."""
    seed = _seed(draw(seed_names))
    region = draw(st.sampled_from(_REGIONS))
    lo, hi = _region(seed, region)
    chunk = st.binary(min_size=1, max_size=16) | st.sampled_from(
        [b"\xff" * 4, b"\0" * 4, b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xff\xfe\x00\xe0"]
    )
    writes = draw(st.lists(st.tuples(st.integers(lo, hi - 1), chunk), min_size=1, max_size=4))
    data = bytearray(seed.data)
    for at, payload in writes:
        data[at : at + len(payload)] = payload[: len(data) - at]
    return Case(seed.name, f"{region} overwrites {writes}", bytes(data))


def _length_values(original: int, size: int, file_size: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * size)) - 1
    special = [0, 1, 2, 3, original - 1, original + 1, original + 2, original * 2, file_size]
    special += [top, top - 1, top >> 1, (top >> 1) + 1, 0xFFFF, 0x10000]
    return st.sampled_from([v % (top + 1) for v in special]) | st.integers(0, top)


@st.composite
def lying_lengths(draw: st.DrawFn) -> Case:
    """One element's (or encapsulated item's) length field rewritten."""
    seed = _seed(draw(seed_names))
    layout = seed.layout
    in_meta = draw(st.integers(0, 3)) == 0  # the data set is the richer target
    fields: list[tuple[int, int, int, ByteOrder]] = []  # (offset, size, value, byte order)
    source = layout.meta if in_meta else layout.body
    order: ByteOrder = "little" if in_meta else layout.order
    for e in layout.meta_elements if in_meta else layout.body_elements:
        value = int.from_bytes(source[e.length_at : e.length_at + e.length_size], order)
        fields.append((e.length_at, e.length_size, value, order))
        if e.tag == 0x7FE00010 and value == _UNDEFINED:
            for at, _, length in _items(source, e.value_start):
                fields.append((at + 4, 4, length, "little"))
    at, size, value, order = draw(st.sampled_from(fields))
    new = draw(_length_values(value, size, len(seed.data)))
    patched = _splice(source, at, at + size, _u(new, size, order))
    data = layout.assemble(meta=patched) if in_meta else layout.assemble(body=patched)
    part = "meta" if in_meta else "data set"
    return Case(seed.name, f"{part} length at {at}: {value} -> {new}", data)


# Tags the decoder reads, and values a hostile header might give them.
_US_VALUES = [0, 1, 2, 3, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 48, 64, 255, 0x7FFF, 0xFFFF]
_NUMBER_STRINGS = [
    b"0", b"-1", b"1", b"2", b"3", b"65536", b"2147483647", b"-2147483648", b"999999999999",
    b"1.5", b"1e308", b"-1e308", b"nan", b"inf", b"-inf", b"abc", b"", b" ", b"1\\2", b"\\",
    b"0.0", b"1e-320",
]  # fmt: skip
_STRINGS = [
    b"MONOCHROME1", b"MONOCHROME2", b"RGB", b"YBR_FULL", b"YBR_FULL_422", b"PALETTE COLOR",
    b"YBR_ICT", b"HSV", b"", b"monochrome2", b"MONOCHROME2\\RGB", b"\xff\xfe", b"SIGMOID",
    b"LINEAR_EXACT", b"LINEAR",
]  # fmt: skip
_US_TAGS = {
    0x00280002: "SamplesPerPixel",
    0x00280006: "PlanarConfiguration",
    0x00280010: "Rows",
    0x00280011: "Columns",
    0x00280100: "BitsAllocated",
    0x00280101: "BitsStored",
    0x00280102: "HighBit",
    0x00280103: "PixelRepresentation",
}
_STRING_TAGS = {
    0x00280004: ("CS", "PhotometricInterpretation"),
    0x00281056: ("CS", "VOILUTFunction"),
}
_NUMBER_TAGS = {
    0x00280008: ("IS", "NumberOfFrames"),
    0x00281050: ("DS", "WindowCenter"),
    0x00281051: ("DS", "WindowWidth"),
    0x00281052: ("DS", "RescaleIntercept"),
    0x00281053: ("DS", "RescaleSlope"),
}


def _even(value: bytes, pad: bytes = b" ") -> bytes:
    return value + pad if len(value) % 2 else value


def _put(layout: Layout, tag: int, new: bytes | None) -> bytes:
    """The data set with ``tag`` replaced by the encoded ``new`` (None deletes it).

    A tag not present yet is inserted in tag order.
    """
    body = layout.body
    old = layout.element(tag)
    if old is not None:
        return _splice(body, old.start, old.end, new or b"")
    at = next((e.start for e in layout.body_elements if e.tag > tag), len(body))
    return _splice(body, at, at, new or b"")


@st.composite
def header_values(draw: st.DrawFn) -> Case:
    """1-4 image-pixel fields set to hostile values (proper VR), deleted or added."""
    seed = _seed(draw(seed_names))
    layout = seed.layout
    edits = []
    tags = sorted(_US_TAGS) + sorted(_STRING_TAGS) + sorted(_NUMBER_TAGS) + [0x7FE00010]
    for tag in draw(st.lists(st.sampled_from(tags), min_size=1, max_size=4, unique=True)):
        action = draw(st.sampled_from(["set", "set", "set", "delete"]))
        if tag == 0x7FE00010 or action == "delete":
            new = None
            edits.append(f"delete {tag:08X}")
        elif tag in _US_TAGS:
            value = draw(st.sampled_from(_US_VALUES) | st.integers(0, 0xFFFF))
            multi = draw(st.sampled_from([1, 1, 1, 0, 2]))  # VM 0 and 2 are lies too
            payload = _u(value, 2, layout.order) * multi
            new = _encode_element(tag, "US", payload, layout.explicit, layout.order)
            edits.append(f"{_US_TAGS[tag]}={value} x{multi}")
        else:
            vr, keyword = _STRING_TAGS.get(tag) or _NUMBER_TAGS[tag]
            pool = _STRINGS if tag in _STRING_TAGS else _NUMBER_STRINGS
            text = draw(st.sampled_from(pool))
            new = _encode_element(tag, vr, _even(text), layout.explicit, layout.order)
            edits.append(f"{keyword}={text!r}")
        layout = _layout(layout.assemble(body=_put(layout, tag, new)))
    return Case(seed.name, "; ".join(edits), layout.assemble())


@st.composite
def rewritten_with_pydicom(draw: st.DrawFn) -> Case:
    """Huge but well-typed geometry written by pydicom itself (a lying, tidy header)."""
    seed = _seed(draw(seed_names))
    ds = pydicom.dcmread(io.BytesIO(seed.data))
    edits = {}
    for keyword in draw(
        st.lists(
            st.sampled_from(["Rows", "Columns", "BitsAllocated", "BitsStored", "NumberOfFrames"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    ):
        if keyword == "NumberOfFrames":
            value: int = draw(st.sampled_from([0, 2, 3, 1000, 2**31 - 1]) | st.integers(-5, 10**11))
        else:
            value = draw(st.sampled_from([1, 2, 8, 16, 32, 64, 4096, 0x8000, 0xFFFF]))
        setattr(ds, keyword, value)
        edits[keyword] = value
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return Case(seed.name, f"pydicom set {edits}", buffer.getvalue())


def _values_for_vr(draw: st.DrawFn, original: bytes, order: ByteOrder) -> bytes:
    return draw(
        st.sampled_from(
            [
                original,
                original[:1],
                original + original,
                b"",
                b"512 ",
                b"-1",
                b"4e9 ",
                b"abcd",
                _u(int.from_bytes(original[:2] or b"\0", order) << 16, 4, order),
                b"\xff" * 8,
            ]
        )
        | st.binary(max_size=12)
    )


@st.composite
def wrong_vrs(draw: st.DrawFn) -> Case:
    """An element re-encoded with another (or a nonsense) VR and a value to match or not."""
    seed = _seed(draw(seed_names))
    layout = seed.layout
    targets = [e for e in layout.body_elements if e.tag in _US_TAGS or e.tag in _STRING_TAGS]
    targets += [e for e in layout.body_elements if e.tag in _NUMBER_TAGS or e.tag == 0x7FE00010]
    target = draw(st.sampled_from(targets) | st.sampled_from(layout.body_elements))
    vr = draw(st.sampled_from(_ALL_VRS) | st.text("ABCDEFOSUXZ \0\xff", min_size=2, max_size=2))
    original = layout.body[target.value_start : target.end]
    if target.tag == 0x7FE00010:
        value = original if draw(st.booleans()) else original[:64]
    else:
        value = _values_for_vr(draw, original, layout.order)
    new = _encode_element(target.tag, vr, value, layout.explicit, layout.order)
    body = _splice(layout.body, target.start, target.end, new)
    return Case(
        seed.name, f"{target.tag:08X} as {vr!r} = {value[:16]!r}", layout.assemble(body=body)
    )


_INTERESTING_TAGS = [
    *_US_TAGS,
    *_STRING_TAGS,
    *_NUMBER_TAGS,
    0x00020010,  # a transfer syntax inside the data set
    0x00281101,  # red palette descriptor
    0x00281201,  # red palette data
    0x00283000,  # Modality LUT Sequence
    0x00283010,  # VOI LUT Sequence
    0x00283002,  # LUT Descriptor (out of its sequence)
    0x7FE00001,  # Extended Offset Table
    0x7FE00002,  # Extended Offset Table Lengths
    0x7FE00008,  # Float Pixel Data
    0x7FE00009,  # Double Float Pixel Data
    0x7FE00010,  # a second Pixel Data
    0x7FE00000,  # group length
    0x00090010,  # private creator
    _ITEM,
    _SEQUENCE_END,
]


@st.composite
def _lut_sequence(draw: st.DrawFn, explicit: bool, order: ByteOrder) -> bytes:
    """A Modality/VOI LUT item with a random descriptor and table."""
    entries = draw(st.sampled_from([0, 1, 2, 256, 4096, 65535]) | st.integers(0, 0xFFFF))
    first = draw(st.integers(0, 0xFFFF))
    bits = draw(st.sampled_from([8, 10, 12, 16, 0, 255]))
    descriptor_vr = draw(st.sampled_from(["US", "SS"]))
    descriptor = b"".join(_u(v, 2, order) for v in (entries, first, bits))
    table = draw(st.binary(min_size=0, max_size=64))
    table = table * draw(st.integers(1, 64))
    item = _encode_element(0x00283002, descriptor_vr, descriptor, explicit, order)
    item += _encode_element(0x00283006, "OW", _even(table, b"\0"), explicit, order)
    return item


@st.composite
def inserted_elements(draw: st.DrawFn) -> Case:
    """1-3 elements (random, pixel-related or LUT sequences) inserted at element boundaries."""
    seed = _seed(draw(seed_names))
    layout = seed.layout
    boundaries = [e.start for e in layout.body_elements] + [len(layout.body)]
    insertions = []
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.sampled_from(boundaries))
        kind = draw(st.sampled_from(["random", "interesting", "lut", "garbage"]))
        if kind == "garbage":
            new = draw(st.binary(min_size=1, max_size=24))
        elif kind == "lut":
            tag = draw(st.sampled_from([0x00283000, 0x00283010]))
            item = draw(_lut_sequence(layout.explicit, layout.order))
            value = _u(_ITEM >> 16, 2, layout.order) + _u(_ITEM, 2, layout.order)
            value += _u(len(item), 4, layout.order) + item
            new = _encode_element(tag, "SQ", value, layout.explicit, layout.order)
        else:
            tags = st.sampled_from(_INTERESTING_TAGS)
            tag = draw(tags if kind == "interesting" else tags | st.integers(0, 0xFFFFFFFF))
            vr = draw(st.sampled_from(_ALL_VRS))
            value = draw(st.binary(max_size=32) | st.sampled_from([b"512 ", b"\xff\xff", b""]))
            new = _encode_element(tag, vr, value, layout.explicit, layout.order)
        insertions.append((at, kind, new))
    body = layout.body
    # From the end backwards, so earlier offsets stay valid.
    for at, _, new in sorted(insertions, key=lambda i: -i[0]):
        body = _splice(body, at, at, new)
    notes = "; ".join(f"{kind} {new[:24]!r} at {at}" for at, kind, new in insertions)
    return Case(seed.name, notes, layout.assemble(body=body))


def _item(tag: int, value: bytes, length: int | None = None) -> bytes:
    head = _u(tag >> 16, 2, "little") + _u(tag, 2, "little")
    return head + _u(len(value) if length is None else length, 4, "little") + value


@st.composite
def mangled_fragments(draw: st.DrawFn) -> Case:
    """The encapsulated pixel data's offset table, fragments or delimiter mangled."""
    seed = _seed(draw(st.sampled_from(_ENCAPSULATED)))
    layout = seed.layout
    pixel = layout.element(0x7FE00010)
    assert pixel is not None
    raw = _items(layout.body, pixel.value_start)
    values = [layout.body[at + 8 : at + 8 + length] for at, tag, length in raw if tag == _ITEM]
    table, fragments = values[0], values[1:]
    tail = _item(_SEQUENCE_END, b"")
    frames: int | None = None
    extended_table = False
    notes = []
    for op in draw(
        st.lists(
            st.sampled_from(
                ["table", "table_length", "split", "empty", "garbage", "swap", "drop", "tail"]
                + ["frames", "extended_table", "item_tag"]
            ),
            min_size=1,
            max_size=3,
        )
    ):
        if op == "table":
            offsets = draw(
                st.lists(st.sampled_from([0, 1, 2, 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF))
            )
            table = b"".join(_u(v, 4, "little") for v in offsets)
            notes.append(f"offset table {offsets}")
        elif op == "table_length":
            table = table + draw(st.binary(min_size=1, max_size=7))
            notes.append(f"offset table of {len(table)} bytes")
        elif op == "split" and fragments:
            index = draw(st.integers(0, len(fragments) - 1))
            whole = fragments[index]
            cuts = sorted(draw(st.lists(st.integers(0, len(whole)), min_size=1, max_size=4)))
            pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
            fragments[index : index + 1] = pieces
            notes.append(f"fragment {index} split at {cuts}")
        elif op == "empty":
            fragments.insert(draw(st.integers(0, len(fragments))), b"")
            notes.append("empty fragment")
        elif op == "garbage":
            junk = draw(st.binary(min_size=1, max_size=64))
            fragments.insert(draw(st.integers(0, len(fragments))), junk)
            notes.append(f"garbage fragment {junk[:16]!r}")
        elif op == "swap" and len(fragments) > 1:
            fragments.reverse()
            notes.append("fragments reversed")
        elif op == "drop" and fragments:
            del fragments[draw(st.integers(0, len(fragments) - 1))]
            notes.append("fragment dropped")
        elif op == "tail":
            tail = draw(st.sampled_from([b"", b"\0" * 8, _item(_ITEM_END, b""), _item(_ITEM, b"")]))
            notes.append(f"delimiter -> {tail!r}")
        elif op == "frames":
            frames = draw(st.sampled_from([0, 2, 3, 7]) | st.integers(-3, 1000))
            notes.append(f"NumberOfFrames {frames}")
        elif op == "extended_table":
            extended_table = True
        elif op == "item_tag":
            tail = _item(draw(st.integers(0, 0xFFFFFFFF)), b"") + tail
            notes.append("stray tag before the delimiter")
    value = _item(_ITEM, table) + b"".join(_item(_ITEM, f) for f in fragments) + tail
    body = layout.body[: pixel.value_start] + value  # Pixel Data is the last element
    if frames is not None:
        tag = 0x00280008
        text = _even(str(frames).encode())
        body = _put(
            dataclasses.replace(layout, body=body),
            tag,
            _encode_element(tag, "IS", text, layout.explicit, layout.order),
        )
    if extended_table:
        count = draw(st.integers(0, 4))
        eight_bytes = st.integers(0, 2**64 - 1).map(lambda v: _u(v, 8, "little"))
        starts = b"".join(draw(eight_bytes) for _ in range(count))
        lengths = b"".join(draw(eight_bytes) for _ in range(count))
        extra = _encode_element(0x7FE00001, "OV", starts, True, "little")
        extra += _encode_element(0x7FE00002, "OV", lengths, True, "little")
        # Pixel Data (still last) starts before its element header and value.
        at = len(body) - len(value) - (pixel.value_start - pixel.start)
        body = _splice(body, at, at, extra)
        notes.append(f"extended offset table of {count}")
    return Case(seed.name, "; ".join(notes) or "re-encapsulated", layout.assemble(body=body))


_CODESTREAM_SEEDS = tuple(
    name for name, spec in SEEDS.items() if spec.encoding in ("jpegls", "j2k", "jpeg_baseline")
)
# Image sizes a codestream may claim: some a decoder would fill in a second
# (gigabytes), some it would refuse at once, some plausible.
_SIDES = [0, 1, 2, 7, 255, 256, 4096, 8192, 12000, 16000, 23000, 30000, 65535]
_J2K_FIELDS = {"Xsiz": (4, 4), "Ysiz": (8, 4), "XTsiz": (20, 4), "YTsiz": (24, 4)}
_J2K_FIELDS |= {"XOsiz": (12, 4), "Csiz": (36, 2), "Ssiz": (38, 1)}
_JPEG_FIELDS = {"P": (4, 1), "Y": (5, 2), "X": (7, 2), "Nf": (9, 1)}


@st.composite
def codestream_lies(draw: st.DrawFn) -> Case:
    """The compressed frame's own header (J2K SIZ, JPEG/JPEG-LS SOF) claims another image.

    The DICOM header still says the seed's small size, so max_pixels cannot
    see it; only a check of the codestream against the header can.
    """
    seed = _seed(draw(st.sampled_from(_CODESTREAM_SEEDS)))
    data = bytearray(seed.data)
    if SEEDS[seed.name].encoding == "j2k":
        at = data.index(b"\xff\x4f\xff\x51", seed.pixel_start) + 4  # SOC, SIZ: at Lsiz
        fields = _J2K_FIELDS
    else:
        sof = (b"\xff\xc0", b"\xff\xc1", b"\xff\xc3", b"\xff\xf7")  # SOF0/1/3/55
        at = min(i for m in sof if (i := data.find(m, seed.pixel_start)) >= 0)  # at the marker
        fields = _JPEG_FIELDS
    edits = []
    for field in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3)):
        offset, size = fields[field]
        top = (1 << (8 * size)) - 1
        value = draw(st.sampled_from([v for v in _SIDES if v <= top]) | st.integers(0, top))
        data[at + offset : at + offset + size] = value.to_bytes(size, "big")
        edits.append(f"{field}={value}")
    return Case(seed.name, "codestream " + ", ".join(edits), bytes(data))


_SINGLE = [
    truncated(),
    bit_flips(),
    byte_overwrites(),
    lying_lengths(),
    header_values(),
    wrong_vrs(),
    inserted_elements(),
    mangled_fragments(),
    codestream_lies(),
]


@st.composite
def stacked(draw: st.DrawFn) -> Case:
    """A structural edit followed by bit flips or a truncation: damage rarely comes alone."""
    case = draw(st.one_of(_SINGLE[3:]))
    data = bytearray(case.data)
    flips = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)), max_size=4))
    for at, bit in flips:
        data[at] ^= 1 << bit
    cut = draw(st.none() | st.integers(0, len(data)))
    return Case(case.seed, f"{case.mutation}; flips {flips}; cut {cut}", bytes(data[:cut]))


# --------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seeds_decode_and_take_the_expected_path(name: str) -> None:
    """The fuzz starts from valid files, and the large ones reach the reduced decoders."""
    if name == "j2k_reduced" and not reduced.j2k_available():
        pytest.skip("glymur has no OpenJPEG 2.4+: neither a system libopenjp2 nor Pillow's copy")
    seed = _seed(name)
    spec = SEEDS[name]
    image = read_image(seed.data, FUZZ_OPTIONS)
    assert image.shape == (spec.rows, spec.cols)
    _, decoded = decode_model_input(seed.data, FUZZ_OPTIONS)
    expected = {"j2k_reduced": "j2k_reduced", "jpeg_scaled": "jpeg_scaled"}.get(name, "full")
    assert decoded.route == expected
    # The offsets the mutations use agree with pydicom's parse.
    ds = pydicom.dcmread(io.BytesIO(seed.data))
    assert [e.tag for e in seed.layout.body_elements] == [int(e.tag) for e in ds]
    rows = seed.layout.element(0x00280010)
    assert rows is not None and rows.end - rows.value_start == 2
    value = seed.layout.body[rows.value_start : rows.end]
    assert int.from_bytes(value, seed.layout.order) == spec.rows


@in_child
@FUZZ
@given(case=truncated(), options=options)
def test_truncated_files_are_rejected_or_decoded(case: Case, options: DecodeOptions) -> None:
    check_contract(case, options)


@in_child
@FUZZ
@given(case=bit_flips(), options=options)
def test_bit_flips(case: Case, options: DecodeOptions) -> None:
    check_contract(case, options)


@in_child
@FUZZ
@given(case=byte_overwrites(), options=options)
def test_byte_overwrites(case: Case, options: DecodeOptions) -> None:
    check_contract(case, options)


@in_child
@FUZZ
@given(case=lying_lengths(), options=options)
def test_lying_lengths(case: Case, options: DecodeOptions) -> None:
    check_contract(case, options)


@in_child
@FUZZ
@given(case=header_values(), options=options)
def test_hostile_header_values(case: Case, options: DecodeOptions) -> None:
    check_contract(case, options)


@in_child
@FUZZ
@given(case=rewritten_with_pydicom(), options=options)
def test_huge_geometry_written_by_pydicom(case: Case, options: DecodeOptions) -> None:
    check_contract(case, options)


@in_child
@FUZZ
@given(case=wrong_vrs(), options=options)
def test_wrong_vrs(case: Case, options: DecodeOptions) -> None:
    check_contract(case, options)


@in_child
@FUZZ
@given(case=inserted_elements(), options=options)
def test_inserted_elements(case: Case, options: DecodeOptions) -> None:
    check_contract(case, options)


@in_child
@FUZZ
@given(case=mangled_fragments(), options=options)
def test_mangled_fragment_table(case: Case, options: DecodeOptions) -> None:
    check_contract(case, options)


@in_child
@FUZZ
@given(case=codestream_lies(), options=options)
def test_codestream_header_lies(case: Case, options: DecodeOptions) -> None:
    check_contract(case, options)


@in_child
@FUZZ
@given(case=stacked(), options=options)
def test_stacked_mutations(case: Case, options: DecodeOptions) -> None:
    check_contract(case, options)
