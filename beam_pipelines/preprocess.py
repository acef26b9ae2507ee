"""Preprocessing job: metadata.csv + DICOMs -> patient-split TFRecord shards.

``xray-preprocess --metadata PATH --output_dir DIR [options] [Beam options]``
(also ``python -m beam_pipelines.preprocess``).

The job is ``ReadValidRows | Preprocess | WriteManifest``
(:mod:`beam_pipelines.transforms`): read and validate the rows, assign
patients to splits, decode every DICOM, write shards, splits.csv, rejects
and, last, manifest.json. Every input row ends in exactly one place: a shard
or a reject record. Runs on any Beam runner; with none given it uses the
local FnApiRunner in multi-processing mode on all cores (the 2.77
DirectRunner would first try to download the Prism runner binary). On
Beam's local runners the same work runs in blocks
(:mod:`beam_pipelines.blocks`, ``--blocks``): the same bytes in flat memory.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from beam_pipelines.blocks.decode import DecodeBlockFn, DecodeBlocks, check_done
from beam_pipelines.blocks.finish import finish
from beam_pipelines.blocks.row_plan import plan_rows
from beam_pipelines.cli import main as cli_main
from beam_pipelines.cli import refuse
from beam_pipelines.contracts import manifest, splits
from beam_pipelines.contracts.metadata import MetadataError
from beam_pipelines.options import (
    add_decode_arguments,
    add_input_arguments,
    allowed_schemes,
    checked_dicomweb,
    decode_options,
    is_local_runner,
    pipeline_options,
    usable_cores,
)
from beam_pipelines.privacy import add_pseudonymize_arguments, pseudonymizer_from_args
from beam_pipelines.storage.committer import open_output
from beam_pipelines.storage.files import flagged_input_problem, remove_matching, remove_tree
from beam_pipelines.storage.paths import archive_root_for
from beam_pipelines.transforms.ordered import part_pattern
from beam_pipelines.transforms.preprocessing import (
    Preprocess,
    WriteManifest,
    rejects_file,
    splits_file,
    staging_dir,
)
from beam_pipelines.transforms.rows import ReadValidRows, check_metadata
from beam_pipelines.transforms.shards import RECORDS_PER_SHARD

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The job's own flags; everything else goes to Beam's PipelineOptions."""
    parser = argparse.ArgumentParser(
        prog="xray-preprocess",
        description="Preprocess a DICOM archive into patient-split TFRecord shards "
        "(unknown flags are Beam pipeline options, e.g. --runner, --direct_num_workers).",
    )
    parser.add_argument("--metadata", required=True, help="metadata.csv (path or URI).")
    parser.add_argument(
        "--output_dir",
        required=True,
        help="Where shards, splits.csv, rejects/ and manifest.json go.",
    )
    parser.add_argument(
        "--archive_root", help="Root that DicomPath is relative to (default: the CSV's folder)."
    )
    add_input_arguments(parser)
    parser.add_argument(
        "--split", default="0.8,0.1,0.1", help="train,validation,test ratios (default 0.8,0.1,0.1)."
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the patient shuffle and of the record order in shards (default 0).",
    )
    parser.add_argument(
        "--pin_splits", help="An earlier splits.csv: its patients keep their split."
    )
    parser.add_argument(
        "--num_shards",
        type=int,
        default=0,
        help=f"Shards per split (default 0: one per {RECORDS_PER_SHARD} records).",
    )
    add_decode_arguments(parser)
    add_pseudonymize_arguments(parser)
    parser.add_argument(
        "--blocks",
        choices=("auto", "on", "off"),
        default="auto",
        help="Plan the rows on the driver and decode them in blocks, so memory stays flat "
        "whatever the archive's size (default auto: on for Beam's local runners, off for "
        "clusters, whose shuffle holds the stages). Same outputs either way.",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="On failure, show the full traceback."
    )
    return parser


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the preprocessing job.

    Returns:
        The manifest written to ``<output_dir>/manifest.json``.
    """
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    plan = _preflight(parser, args)
    options = pipeline_options(beam_args)
    # Locked and checked before any work; everything is written to a private
    # work folder that replaces the previous output only once complete.
    output = open_output(
        "--output_dir", args.output_dir, "xray-preprocess", inputs=(args.metadata, plan["root"])
    )
    with output:
        out = output.job_path
        if args.blocks == "on" or (args.blocks == "auto" and is_local_runner(options)):
            _run_in_blocks(args, plan, out, options)
        else:
            _run_graph(args, plan, out, options)
        # Not inside the pipeline: staged chunks feed every shard writer, which a
        # runner may retry or recompute, and on Dask only the manifest's branch runs.
        remove_tree(staging_dir(out))
        remove_matching([part_pattern(rejects_file(out))])
        with FileSystems.open(f"{out}/{manifest.FILE}") as handle:
            result = json.loads(handle.read().decode("utf-8"))
        output.commit_unless_empty(
            result["kept"],
            f"no row was kept: {result['input_rows']} rows, rejected "
            f"{json.dumps(result['rejected_by_reason'])}",
            rejects="rejects/rejects.jsonl",
            last=manifest.FILE,
        )
    logger.info(
        "Preprocessed %d rows: %d kept, %d rejected -> %s",
        result["input_rows"],
        result["kept"],
        result["rejected"],
        args.output_dir,
    )
    return result


def _run_graph(
    args: argparse.Namespace, plan: dict[str, Any], out: str, options: PipelineOptions
) -> None:
    """The job as one Beam graph: the runner's shuffle holds what crosses its stages."""
    with beam.Pipeline(options=options) as pipeline:
        rows, unique, invalid = pipeline | "Rows" >> ReadValidRows(
            args.metadata, plan["root"], plan["schemes"], pseudonymizer=plan["pseudonymizer"]
        )
        written = unique | "Preprocess" >> Preprocess(
            out,
            plan["ratios"],
            args.seed,
            plan["pinned"],
            args.num_shards,
            plan["decoding"],
            args.resize_policy,
            plan["pseudonymizer"],
        )
        rejects = (invalid, written["rejects"]) | "AllRejects" >> beam.Flatten()
        _ = rows | "Finish" >> WriteManifest(out, rejects, written, _settings(args, plan))


def _run_in_blocks(
    args: argparse.Namespace, plan: dict[str, Any], out: str, options: PipelineOptions
) -> None:
    """The job in blocks (:mod:`beam_pipelines.blocks`): flat memory on one machine."""
    folder = f"{staging_dir(out)}/blocks"
    rows = plan_rows(
        args.metadata,
        plan["root"],
        plan["schemes"],
        plan["pseudonymizer"],
        plan["ratios"],
        args.seed,
        plan["pinned"],
        folder,
        splits_file(out),
    )
    blocks = rows.blocks(options.view_as(DirectOptions).direct_num_workers or usable_cores())
    if blocks:
        decode = DecodeBlockFn(
            folder,
            rows.sizes,
            plan["decoding"],
            args.resize_policy,
            staging_dir(out),
            args.num_shards,
            plan["pseudonymizer"],
        )
        with beam.Pipeline(options=options) as pipeline:
            _ = pipeline | "Decode" >> DecodeBlocks(blocks, decode)
    check_done(folder, blocks)
    finish(out, rows, folder, blocks, args.seed, _settings(args, plan))


def _preflight(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Checks every flag and input before any work (exit 2 with the reason); returns the plan."""
    try:
        ratios = splits.parse_ratios(args.split)
    except ValueError as exc:
        parser.error(str(exc))
    problem = flagged_input_problem(
        [("--metadata", args.metadata), ("--pin_splits", args.pin_splits)]
    )
    if problem:
        refuse(parser.prog, problem)
    root = archive_root_for(args.metadata, args.archive_root)
    pinned: dict[str, str] = {}
    if args.pin_splits:
        with FileSystems.open(args.pin_splits) as handle:
            pinned = splits.read_splits_csv(handle.read().decode("utf-8"))
    checked_dicomweb(parser, args)
    try:
        schemes = allowed_schemes(args, root, args.metadata)
    except ValueError as exc:
        parser.error(f"--allowed_schemes: {exc}")
    # A CSV that cannot be used at all fails here, before an earlier run's
    # outputs could be replaced.
    try:
        check_metadata(args.metadata)
    except MetadataError as exc:
        parser.error(f"--metadata {args.metadata}: {exc}")
    try:
        pseudonymizer = pseudonymizer_from_args(args)
    except ValueError as exc:
        parser.error(f"pseudonymization: {exc}")
    return {
        "ratios": ratios,
        "root": root,
        "pinned": pinned,
        "schemes": schemes,
        "pseudonymizer": pseudonymizer,
        "decoding": decode_options(args),
    }


def _settings(args: argparse.Namespace, plan: dict[str, Any]) -> dict[str, Any]:
    """The run's options as the manifest records them."""
    decoding, pseudonymizer = plan["decoding"], plan["pseudonymizer"]
    return {
        "metadata": args.metadata,
        "archive_root": plan["root"],
        "allowed_schemes": sorted(plan["schemes"]),
        "split": list(plan["ratios"]),
        "seed": args.seed,
        "pin_splits": args.pin_splits,
        "num_shards": args.num_shards,
        "resize_policy": args.resize_policy,
        "decode": {
            "voi_index": decoding.voi_index,
            "multiframe": args.multiframe,
            "color": args.color,
            "reduced_resolution": decoding.reduced_resolution,
            "range_source": decoding.range_source,
        },
        # Names the key (not the key): jobs given the same key match it.
        "pseudonymized": pseudonymizer.fingerprint if pseudonymizer else None,
    }


def _describe(manifest: dict[str, Any]) -> str:
    return (
        f"xray-preprocess: {manifest['input_rows']} rows -> {manifest['kept']} kept "
        f"{json.dumps(manifest['counts'])}, {manifest['rejected']} rejected "
        f"{json.dumps(manifest['rejected_by_reason'])}"
    )


def main() -> None:
    """Console entry point: ``xray-preprocess``."""
    cli_main("xray-preprocess", run, _describe)


if __name__ == "__main__":
    main()
