"""Batch scoring job: a trained model over a whole archive.

``xray-score --model RESULTS/model (--metadata CSV | --dicom_glob GLOB | --data_dir DIR)
--output PREFIX [--batch_size N] [Beam options]`` (also ``python -m beam_pipelines.score``).

The job is ``ReadExamples | Score | WriteScores`` (:mod:`beam_pipelines.transforms.scoring`).
Inputs: a metadata.csv (labels optional), a glob of DICOM files (the header
fills PatientID, StudyID, view, age and sex), or preprocessed shards. DICOM
inputs are decoded and resized with exactly the functions preprocessing uses
and quantized as a record stores them, so an image scores the same from its
DICOM file and from its shard. The model runs under ``RunInference`` (batched,
one model per worker process). Outputs:

- ``PREFIX-SSSSS-of-NNNNN.parquet``: the predictions contract
  (``beam_pipelines.contracts.predictions``), rows sorted by path within
  hash-assigned shards, each file written atomically;
- ``<dir of PREFIX>/rejects/<name>.jsonl``: inputs that could not be scored,
  with reasons;
- ``PREFIX.summary.json``: inputs = scored + rejected, per reason.

``--output DIR/`` (or an existing folder) means files with ordinary names in
that folder: ``part-SSSSS-of-NNNNN.parquet``, ``rejects/rejects.jsonl``,
``summary.json`` (``contracts.predictions.scoring_files``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import posixpath
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipelines.cli import main as cli_main
from beam_pipelines.cli import refuse
from beam_pipelines.console import announce_total_later
from beam_pipelines.contracts import manifest, predictions
from beam_pipelines.contracts.metadata import SCORING_REQUIRED_COLUMNS, MetadataError
from beam_pipelines.contracts.structured_report import SOURCE_KEYWORDS
from beam_pipelines.options import (
    add_decode_arguments,
    add_input_arguments,
    allowed_schemes,
    checked_dicomweb,
    decode_options,
    pipeline_options,
)
from beam_pipelines.privacy import add_pseudonymize_arguments, pseudonymizer_from_args
from beam_pipelines.results_options import add_results_arguments, results_plan
from beam_pipelines.storage.committer import open_output
from beam_pipelines.storage.files import (
    flagged_input_problem,
    is_local,
    local_path,
    remove_matching,
)
from beam_pipelines.storage.paths import archive_root_for
from beam_pipelines.transforms.inference import model_card_path, model_file_problem
from beam_pipelines.transforms.ordered import part_pattern
from beam_pipelines.transforms.results import WriteResults, prediction_row
from beam_pipelines.transforms.rows import check_metadata
from beam_pipelines.transforms.scoring import ReadExamples, Score, WriteScores
from beam_pipelines.transforms.shards import ROWS_PER_SHARD

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The job's own flags; everything else goes to Beam's PipelineOptions."""
    parser = argparse.ArgumentParser(
        prog="xray-score",
        description="Score a DICOM archive or preprocessed shards with a trained model "
        "(unknown flags are Beam pipeline options, e.g. --runner).",
    )
    parser.add_argument("--model", required=True, help="The exported model folder (RESULTS/model).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--metadata", help="metadata.csv of the archive (labels optional).")
    source.add_argument("--dicom_glob", help="Glob of DICOM files, e.g. 'gs://b/archive/**.dcm'.")
    source.add_argument("--data_dir", help="Preprocessed output: scores every split's shards.")
    parser.add_argument(
        "--output",
        required=True,
        help="A prefix (predictions/archive: archive-*.parquet, archive.summary.json) or a "
        "folder (predictions/ or an existing folder: part-*.parquet, summary.json).",
    )
    parser.add_argument("--archive_root", help="Root of DicomPath (default: the CSV's folder).")
    add_input_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=32, help="Largest inference batch.")
    parser.add_argument(
        "--num_shards", type=int, default=0, help=f"Output files (0: one per {ROWS_PER_SHARD})."
    )
    parser.add_argument("--model_id", help="Recorded in every row (default: the model card's).")
    parser.add_argument(
        "--threshold",
        type=float,
        help="Score at or above which 'predicted' is 1 (default: the model's operating point, "
        "chosen on the validation split at training).",
    )
    add_decode_arguments(parser)
    add_pseudonymize_arguments(parser)
    add_results_arguments(parser)
    parser.add_argument(
        "--verbose", action="store_true", help="On failure, show the full traceback."
    )
    return parser


def _shard_pattern(data_dir: str) -> str:
    """Every split's shards under data_dir (its name literal: 'run?' never matches 'runA')."""
    import glob

    return f"{glob.escape(data_dir.rstrip('/'))}/*/part-*.tfrecord.gz"


def _input_count(args: argparse.Namespace) -> int | None:
    """How many images the run will read (for the progress bar), or None when unknown.

    From a metadata.csv the reading stage announces its row count itself.
    """
    if args.metadata:
        return None
    if args.dicom_glob:
        return len(FileSystems.match([args.dicom_glob])[0].metadata_list)
    found = _shards_manifest(args.data_dir)
    return None if found is None else int(found["kept"])


def _shards_manifest(data_dir: str) -> dict[str, Any] | None:
    """The manifest.json preprocessing wrote beside the shards, or None when there is none."""
    path = f"{data_dir.rstrip('/')}/{manifest.FILE}"
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return dict(json.loads(handle.read()))


def _shards_pseudonym_key(data_dir: str) -> str | None:
    """The key fingerprint preprocessing recorded for these shards, or None."""
    found = _shards_manifest(data_dir)
    return None if found is None else found.get("options", {}).get("pseudonymized")


def _operating_point(model_dir: str, threshold: float | None) -> dict[str, Any] | None:
    """The threshold 'predicted' uses: --threshold, else the model's operating point, else None.

    Raises:
        ValueError: a --threshold outside [0, 1] or an unreadable operating point file.
    """
    from beam_pipelines.contracts import operating_point

    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"--threshold must be in [0, 1], not {threshold}")
        return {"rule": "fixed", "threshold": threshold, "chosen_on": "--threshold"}
    try:
        point = operating_point.read(model_dir)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--model {model_dir}: unreadable {operating_point.FILE} ({exc})") from exc
    if point is None:
        logger.warning("The model has no operating point: 'predicted' stays empty (--threshold)")
    return point


def _model_id(model_dir: str, given: str | None) -> str:
    if given:
        return given
    card = model_card_path(model_dir)
    if FileSystems.exists(card):
        with FileSystems.open(card) as handle:
            return json.loads(handle.read())["model_id"]
    return posixpath.basename(model_dir.rstrip("/"))


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the scoring job; returns the summary written beside the predictions."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    plan = _preflight(parser, args)
    announce_total_later(lambda: _input_count(args))
    beam_options = pipeline_options(beam_args)
    # Locked and checked before any work; the files are written to a private
    # work folder and renamed into place, summary last, once complete.
    folder = _names_a_folder(args.output)
    output = open_output(
        "--output", args.output, "xray-score", folder=folder, inputs=(args.metadata or "",)
    )
    paths = predictions.scoring_files(output.work, None if folder else output.target.name)
    point, pseudonymizer = plan["point"], plan["pseudonymizer"]
    with output:
        with beam.Pipeline(options=beam_options) as pipeline:
            inputs, examples, input_rejects = pipeline | "Read" >> ReadExamples(
                _shard_pattern(args.data_dir) if args.data_dir else None,
                args.metadata,
                args.dicom_glob,
                plan["root"],
                plan["schemes"],
                plan["decoding"],
                args.resize_policy,
            )
            threshold = point["threshold"] if point else None
            scored, failed = examples | "Score" >> Score(
                args.model, args.batch_size, plan["model_id"], threshold
            )
            rejects = (input_rejects, failed) | "AllRejects" >> beam.Flatten()
            fields = {key: plan[key] for key in ("model_id", "point", "pseudonymized")}
            results = None
            if plan["results"] is not None:
                target, report_run = plan["results"]
                counts, result_rejects = scored | "Results" >> WriteResults(
                    target, report_run, pseudonymizer
                )
                scored = scored | "PredictionRows" >> beam.Map(prediction_row)
                results = (counts, _pseudonymized(result_rejects, pseudonymizer, "Results"))
                fields |= {
                    "results_target": args.results_to or args.results_dir,
                    "series": {
                        "series_description": report_run.series_description,
                        "series_number": report_run.series_number,
                    },
                }
            if pseudonymizer is not None:
                # Decoding needed the real paths; nothing written keeps them.
                scored = scored | "PseudonymizePredictions" >> beam.Map(pseudonymizer.record)
            rejects = _pseudonymized(rejects, pseudonymizer, "")
            _ = inputs | "Write" >> WriteScores(
                paths, args.num_shards, scored, rejects, fields, results
            )
        remove_matching([part_pattern(paths["rejects"])])  # after the run: see WriteRejects
        with FileSystems.open(paths["summary"]) as handle:
            summary = json.loads(handle.read())
        output.commit_unless_empty(
            summary["scored"],
            f"nothing was scored: {summary['inputs']} inputs, rejected "
            f"{json.dumps(summary['rejected_by_reason'])}",
            rejects=summary["rejects_file"],
            last=posixpath.basename(paths["summary"]),
        )
    logger.info(
        "Scored %d of %d inputs (%d rejected) -> %s",
        summary["scored"],
        summary["inputs"],
        summary["rejected"],
        args.output,
    )
    return summary


def _pseudonymized(rejects: Any, pseudonymizer: Any, name: str) -> Any:
    """Reject records with their identifiers replaced, when the run has a key."""
    if pseudonymizer is None:
        return rejects
    return rejects | f"Pseudonymize{name}Rejects" >> beam.Map(pseudonymizer.record)


def _names_a_folder(output: str) -> bool:
    """``--output DIR/`` or an existing folder: files with ordinary names in that folder."""
    return output.endswith("/") or (is_local(output) and os.path.isdir(local_path(output)))


def _preflight(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Checks every flag and input before any work (exit 2 with the reason); returns the plan."""
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    problem = flagged_input_problem([("--metadata", args.metadata)])
    if problem:
        refuse(parser.prog, problem)
    root = archive_root_for(args.metadata or "", args.archive_root)
    checked_dicomweb(parser, args)
    try:
        schemes = allowed_schemes(args, root, args.metadata or "")
    except ValueError as exc:
        parser.error(f"--allowed_schemes: {exc}")
    if args.metadata:
        # A CSV that cannot be used at all fails here, before an earlier run's
        # outputs could be replaced.
        try:
            check_metadata(args.metadata, SCORING_REQUIRED_COLUMNS)
        except MetadataError as exc:
            parser.error(f"--metadata {args.metadata}: {exc}")
    if args.data_dir and not FileSystems.match([_shard_pattern(args.data_dir)])[0].metadata_list:
        parser.error(f"--data_dir {args.data_dir} holds no shards")
    try:
        pseudonymizer = pseudonymizer_from_args(args)
    except ValueError as exc:
        parser.error(f"pseudonymization: {exc}")
    # Shards made with a key already hold pseudonyms: never hash them twice.
    already = _shards_pseudonym_key(args.data_dir) if args.data_dir else None
    if already and pseudonymizer and pseudonymizer.fingerprint != already:
        parser.error("the pseudonymization key differs from the one the shards were made with")
    pseudonymized = already or (pseudonymizer.fingerprint if pseudonymizer else None)
    # Last of the checks: it reads the whole model file.
    problem = model_file_problem(args.model)
    if problem:
        refuse(parser.prog, f"--model {args.model}: {problem}")
    try:
        point = _operating_point(args.model, args.threshold)
    except ValueError as exc:
        refuse(parser.prog, str(exc))
    model_id = _model_id(args.model, args.model_id)
    results = results_plan(parser, args, model_id, point, pseudonymized)
    return {
        "root": root,
        "schemes": schemes,
        "pseudonymizer": None if already else pseudonymizer,
        "pseudonymized": pseudonymized,
        "model_id": model_id,
        "point": point,
        # With results, decoding keeps the header values their reports name.
        "decoding": dataclasses.replace(
            decode_options(args), reference_keywords=SOURCE_KEYWORDS if results else ()
        ),
        "results": results,
    }


def _describe(summary: dict[str, Any]) -> str:
    line = (
        f"xray-score: {summary['inputs']} inputs -> {summary['scored']} scored, "
        f"{summary['rejected']} rejected {json.dumps(summary['rejected_by_reason'])}"
    )
    results = summary.get("results")
    if results:
        line += (
            f"; reports: {results['stored']} stored, {results['already_present']} already "
            f"there, {results['refused']} not stored {json.dumps(results['refused_by_reason'])}"
        )
    return line


def main() -> None:
    """Console entry point: ``xray-score``."""
    cli_main("xray-score", run, _describe)


if __name__ == "__main__":
    main()
