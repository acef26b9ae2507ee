"""Beam pipeline options shared by the jobs: the documented default runner."""

from __future__ import annotations

import argparse
import os

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from beam_pipelines.dicom import DecodeOptions
from beam_pipelines.storage.paths import allowed_schemes_for, parse_schemes

_BEAM_DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"


def usable_cores() -> int:
    """Cores this process may run on (affinity and cgroup-limited), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    """Options for the remaining (Beam) flags, with the local default filled in.

    With no ``--runner``: the FnApiRunner in multi-processing mode with one
    worker per usable core. Not the DirectRunner: in Beam 2.77 it first tries
    to download the Prism runner, which fails offline and, online, ignores
    the multi-processing flags. ``--runner=DaskRunner`` (also Beam's full
    class path) is the project's :class:`beam_pipelines.dask_runner.DaskRunner`:
    Beam's loses what DoFns emit in ``finish_bundle`` and recomputes side inputs.
    """
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    if standard.runner in ("DaskRunner", _BEAM_DASK_RUNNER):
        standard.runner = "beam_pipelines.dask_runner.DaskRunner"
    if standard.runner is None:
        standard.runner = "FnApiRunner"
        direct = options.view_as(DirectOptions)
        given = " ".join(beam_args)
        if "--direct_running_mode" not in given:
            direct.direct_running_mode = "multi_processing"
        if "--direct_num_workers" not in given:
            # Not 0: Beam turns 0 into cpu_count(), which ignores CPU limits.
            direct.direct_num_workers = usable_cores()
    return options


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding flags, shared by preprocessing and scoring so they always match."""
    parser.add_argument(
        "--resize_policy",
        choices=("pad", "stretch"),
        default="pad",
        help="How images become 224x224 (default pad: keep the aspect ratio).",
    )
    parser.add_argument(
        "--voi_index",
        type=int,
        default=0,
        help="Which VOI window to apply; -1 ignores VOI (default 0, the first).",
    )
    parser.add_argument(
        "--multiframe",
        choices=("first", "reject"),
        default="first",
        help="Multi-frame images: decode frame 0 or reject (default first).",
    )
    parser.add_argument(
        "--color",
        choices=("gray_only", "luminance", "reject"),
        default="gray_only",
        help="Colour-encoded images (default gray_only: accept only when the channels agree).",
    )
    parser.add_argument(
        "--full_resolution_decode",
        action="store_true",
        help="Decode every pixel of JPEG 2000 / JPEG images instead of the reduced resolution "
        "(still >= the model input) their codecs can decode directly, ~10x faster for J2K.",
    )
    parser.add_argument(
        "--range_source",
        choices=("image", "bit_range"),
        default="image",
        help="Images without a usable VOI window: scale by the image's own stored range "
        "(default; header Smallest/Largest Image Pixel Value when true, else 0.5/99.5 "
        "percentiles) or by the whole bit range.",
    )
    parser.add_argument(
        "--read_timeout_s",
        type=float,
        default=DecodeOptions.read_timeout_s,
        help="Longest one remote (object store) file may take to read before it is rejected "
        "as unreadable (default %(default)g s).",
    )


def decode_options(args: argparse.Namespace) -> DecodeOptions:
    """DecodeOptions from the flags of :func:`add_decode_arguments`."""
    return DecodeOptions(
        voi_index=None if args.voi_index < 0 else args.voi_index,
        multiframe=args.multiframe,
        color=args.color,
        reduced_resolution=not args.full_resolution_decode,
        read_timeout_s=args.read_timeout_s,
        range_source=args.range_source,
    )


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The metadata.csv input flags, shared by preprocessing and scoring."""
    parser.add_argument(
        "--allowed_schemes",
        default="",
        metavar="SCHEMES",
        help="Comma-separated URI schemes (e.g. gs,s3) a DicomPath in metadata.csv may use "
        "besides local paths and the scheme of --archive_root and --metadata, which are always "
        "allowed (default: no others). A row whose DicomPath is a URI of another scheme "
        "(http://, file://, s3://, ...) is rejected as scheme_not_allowed and never read. "
        "Relative DicomPaths stay under the archive root; one that leaves it, also through a "
        "symlink, is rejected as path_escapes_root.",
    )


def allowed_schemes(args: argparse.Namespace, *locations: str) -> frozenset[str]:
    """The schemes a DicomPath URI may use, from the flags of :func:`add_input_arguments`.

    Those of ``locations`` (the archive root and metadata.csv the user chose)
    plus ``--allowed_schemes``.

    Raises:
        ValueError: for a name in ``--allowed_schemes`` that is not a URI scheme.
    """
    return allowed_schemes_for(locations, parse_schemes(args.allowed_schemes))
