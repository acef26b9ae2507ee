"""Beam pipeline options shared by the jobs: the documented default runner."""

from __future__ import annotations

import argparse
import os

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from beam_pipelines.cli import refuse
from beam_pipelines.dicom import DecodeOptions
from beam_pipelines.storage.dicomweb import (
    PASSWORD_ENV,
    TOKEN_ENV,
    USER_ENV,
    DicomwebSettings,
    check_server,
)
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


#: Beam's runners that run every stage on this machine, holding what crosses stages
#: (lower case, without "runner": Beam accepts e.g. DirectRunner, direct, fnapi).
LOCAL_RUNNERS = ("direct", "fnapi", "switchingdirect", "bundlebaseddirect", "prism")


def is_local_runner(options: PipelineOptions) -> bool:
    """True when the pipeline runs on one of Beam's local runners (by name or class path)."""
    name = str(options.view_as(StandardOptions).runner or "").rsplit(".", 1)[-1].lower()
    return name.removesuffix("runner") in LOCAL_RUNNERS


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
        # Jobs without the DICOMweb flags decode local and object-store paths only.
        dicomweb=dicomweb_settings(args) if hasattr(args, "dicomweb_url") else None,
    )


def add_dicomweb_arguments(parser: argparse.ArgumentParser) -> None:
    """The DICOMweb (PACS) flags: where ``dicomweb+http(s)://`` instances are read from."""
    credentials = (
        f"Credentials never come from the command line: a bearer token from --dicomweb_token_file "
        f"or env {TOKEN_ENV}, else HTTP basic auth from env {USER_ENV} + {PASSWORD_ENV}; they are "
        "sent only to paths under this URL."
    )
    parser.add_argument(
        "--dicomweb_url",
        metavar="URL",
        help="The DICOMweb service's base URL, http(s)://host:port/dicom-web (e.g. Orthanc's). "
        + credentials,
    )
    parser.add_argument(
        "--dicomweb_token_file",
        metavar="FILE",
        help=f"File holding a bearer token for the DICOMweb service (instead of env {TOKEN_ENV}).",
    )
    parser.add_argument(
        "--dicomweb_timeout",
        type=float,
        default=DicomwebSettings.timeout_s,
        metavar="SECONDS",
        help="Longest one DICOMweb request may take, connecting and reading (default %(default)g).",
    )
    parser.add_argument(
        "--dicomweb_retries",
        type=int,
        default=DicomwebSettings.retries,
        help="Extra attempts after HTTP 429/5xx, a connection error or a timeout, with doubling "
        "back-off (default %(default)d); an instance still not fetched is rejected "
        "(fetch_failed).",
    )
    parser.add_argument(
        "--dicomweb_connections",
        type=int,
        default=DicomwebSettings.max_connections,
        help="DICOMweb requests in flight at once per worker process (default %(default)d).",
    )
    parser.add_argument(
        "--dicomweb_ca_bundle",
        metavar="FILE",
        help="CA bundle to check the DICOMweb server's certificate with (default: the system's).",
    )
    parser.add_argument(
        "--dicomweb_insecure",
        action="store_true",
        help="Do not check the DICOMweb server's TLS certificate: for testing only.",
    )


def dicomweb_settings(
    args: argparse.Namespace, flag: str = "--dicomweb_url"
) -> DicomwebSettings | None:
    """DicomwebSettings from the flags of :func:`add_dicomweb_arguments`; None without a URL.

    ``flag`` names the URL's own flag (``--dicomweb_url`` to read from, or
    ``--results_to`` to store to); credentials, time-out, retries and TLS
    come from the shared ``--dicomweb_*`` flags either way.

    Raises:
        ValueError: naming the flag, for a URL that is not http(s) or a bad number.
    """
    url = getattr(args, flag.lstrip("-"))
    if not url:
        return None
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"{flag} must be an http:// or https:// URL")
    if not args.dicomweb_timeout > 0:
        raise ValueError("--dicomweb_timeout must be positive")
    if args.dicomweb_retries < 0:
        raise ValueError("--dicomweb_retries must be >= 0")
    if args.dicomweb_connections < 1:
        raise ValueError("--dicomweb_connections must be >= 1")
    try:
        return DicomwebSettings(
            url=url,
            token_file=args.dicomweb_token_file,
            timeout_s=args.dicomweb_timeout,
            retries=args.dicomweb_retries,
            max_connections=args.dicomweb_connections,
            verify_tls=not args.dicomweb_insecure,
            ca_bundle=args.dicomweb_ca_bundle,
        )
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The metadata.csv input flags, shared by preprocessing and scoring (DICOMweb's too)."""
    parser.add_argument(
        "--allowed_schemes",
        default="",
        metavar="SCHEMES",
        help="Comma-separated URI schemes (e.g. gs,s3) a DicomPath in metadata.csv may use "
        "besides local paths and the scheme of --archive_root and --metadata, which are always "
        "allowed, and dicomweb+http(s) with --dicomweb_url (default: no others). A row whose "
        "DicomPath is a URI of another scheme "
        "(http://, file://, s3://, ...) is rejected as scheme_not_allowed and never read. "
        "Relative DicomPaths stay under the archive root; one that leaves it, also through a "
        "symlink, is rejected as path_escapes_root.",
    )
    add_dicomweb_arguments(parser)


def allowed_schemes(args: argparse.Namespace, *locations: str) -> frozenset[str]:
    """The schemes a DicomPath URI may use, from the flags of :func:`add_input_arguments`.

    Those of ``locations`` (the archive root and metadata.csv the user chose),
    ``dicomweb+http(s)`` when ``--dicomweb_url`` names such a service (its
    instances, as ``xray-index`` writes them; one on another server is
    rejected when fetched), plus ``--allowed_schemes``.

    Raises:
        ValueError: for a name in ``--allowed_schemes`` that is not a URI scheme.
    """
    service = [f"dicomweb+{args.dicomweb_url}"] if args.dicomweb_url else []
    return allowed_schemes_for([*locations, *service], parse_schemes(args.allowed_schemes))


def checked_dicomweb(
    parser: argparse.ArgumentParser, args: argparse.Namespace, flag: str = "--dicomweb_url"
) -> DicomwebSettings | None:
    """Checks the DICOMweb flags and asks the service once, before any work; its settings.

    A bad flag is a usage error; a service that does not answer (down, wrong
    URL, refused credentials) stops the job with one line and exit code 2,
    before any output is touched.
    """
    try:
        settings = dicomweb_settings(args, flag)
    except ValueError as exc:
        parser.error(str(exc))
    if settings is not None:
        problem = check_server(settings)
        if problem:
            refuse(parser.prog, f"{flag}: {problem}" if flag != "--dicomweb_url" else problem)
    return settings
