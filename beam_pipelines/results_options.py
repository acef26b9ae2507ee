"""xray-score's flags for results written back as DICOM Structured Reports, and their checks.

``--results_to URL`` stores one report per scored image to a DICOMweb service
(STOW-RS); ``--results_dir DIR`` writes the same objects as files. The
``--dicomweb_*`` flags (credentials, time-out, retries, connections, TLS)
apply to ``--results_to`` as they do to reading.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import uuid
from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_pipelines.contracts.structured_report import ReportRun
from beam_pipelines.options import checked_dicomweb, decode_options
from beam_pipelines.storage.files import is_local, local_path
from beam_pipelines.transforms.inference import KERAS_FILE, model_card_path
from beam_pipelines.transforms.results import ResultsTarget


def add_results_arguments(parser: argparse.ArgumentParser) -> None:
    """The results flags of xray-score."""
    group = parser.add_argument_group("results written back as DICOM Structured Reports")
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--results_to",
        metavar="DICOMWEB_URL",
        help="Store a DICOM Structured Report of every scored image to this DICOMweb service "
        "with STOW-RS (its base, e.g. http://pacs:8042/dicom-web), in the image's study, one "
        "new series per run; a rerun stores nothing twice. Credentials, time-out and retries: "
        "the --dicomweb_* flags.",
    )
    where.add_argument(
        "--results_dir",
        metavar="DIR",
        help="Write the same reports as files DIR/<study>/<series>/<instance>.dcm.",
    )
    group.add_argument(
        "--results_to_pseudonymized",
        action="store_true",
        help="With a pseudonymization key, store reports (holding pseudonyms only) to "
        "--results_to anyway: a pseudonymous report in a clinical PACS is an error, so "
        "this must be asked for.",
    )
    group.add_argument(
        "--results_batch_size",
        type=int,
        default=32,
        metavar="N",
        help="Reports per STOW-RS request (default 32).",
    )


def results_plan(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    model_id: str,
    point: dict[str, Any] | None,
    pseudonymized: str | None,
) -> tuple[ResultsTarget, ReportRun] | None:
    """Checks the results flags (exit 2 with the reason); the target and the run, or None."""
    if not (args.results_to or args.results_dir):
        if args.results_to_pseudonymized:
            parser.error("--results_to_pseudonymized goes with --results_to")
        return None
    flag = "--results_to" if args.results_to else "--results_dir"
    if args.data_dir:
        parser.error(
            f"{flag} needs DICOM inputs (--metadata or --dicom_glob): preprocessed shards "
            "do not keep the study and patient a report must name"
        )
    if args.results_batch_size < 1:
        parser.error("--results_batch_size must be >= 1")
    if args.results_to and pseudonymized and not args.results_to_pseudonymized:
        parser.error(
            "this run pseudonymizes identifiers: its reports would put pseudonyms into the "
            "PACS at --results_to. Pass --results_to_pseudonymized if that is what you want, "
            "or --results_dir to keep them as files"
        )
    if args.results_to_pseudonymized and not pseudonymized:
        parser.error("--results_to_pseudonymized needs a pseudonymization key")
    try:
        digest = model_digest(args.model)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    run = ReportRun(
        model_id=model_id,
        model_digest=digest,
        threshold=None if point is None else float(point["threshold"]),
        options=scoring_options(args),
        pseudonymized=pseudonymized,
    )
    if args.results_to:
        settings = checked_dicomweb(parser, args, "--results_to")
        target = ResultsTarget(settings=settings, batch_size=args.results_batch_size)
    else:
        problem = folder_problem(args.results_dir)
        if problem:
            parser.error(f"--results_dir {args.results_dir}: {problem}")
        target = ResultsTarget(folder=args.results_dir, batch_size=args.results_batch_size)
    return target, run


#: The decoding settings that change a model input (the others only reject inputs).
PIXEL_OPTIONS = ("voi_index", "range_source", "multiframe", "color", "reduced_resolution")


def scoring_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options besides model and threshold that change a score: how images become inputs.

    Another value is another run (new series, new reports): the PACS never
    keeps a report that says what this run would not.
    """
    decoding = decode_options(args)
    return {
        "resize_policy": str(args.resize_policy),
        **{name: getattr(decoding, name) for name in PIXEL_OPTIONS},
    }


def folder_problem(folder: str) -> str | None:
    """Why reports could not be written under ``folder``, else None; creates nothing locally.

    A local folder (or, while it does not exist yet, its nearest existing
    parent) must be a writable folder; a bucket's scheme must be one Beam
    knows, and a probe object is written there and deleted.
    """
    if is_local(folder):
        path = os.path.abspath(local_path(folder))
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            return "a file stands where a folder is needed"
        if not os.access(path, os.W_OK | os.X_OK):
            return "not writable"
        return None
    try:
        FileSystems.get_filesystem(folder)
        probe = f"{folder.rstrip('/')}/.xray-score-write-check-{uuid.uuid4().hex}"
        with FileSystems.create(probe) as handle:
            handle.write(b"")
        FileSystems.delete([probe])
    except Exception as exc:  # any filesystem's error: the run must not start
        return f"cannot write there ({type(exc).__name__})"
    return None


def model_digest(model_dir: str) -> str:
    """SHA-256 of the model card beside the model folder, else of the Keras model file.

    The card names the training data, settings and metrics; a retrained model
    has a new card, so a new digest: its reports never overwrite another's.
    """
    for path in (model_card_path(model_dir), f"{model_dir.rstrip('/')}/{KERAS_FILE}"):
        if FileSystems.exists(path):
            digest = hashlib.sha256()
            with FileSystems.open(path) as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
            return digest.hexdigest()
    raise ValueError(f"--model {model_dir}: neither a model card nor model.keras to identify it")
