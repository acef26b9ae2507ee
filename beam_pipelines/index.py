"""Index job: a DICOM archive where it lives -> metadata.csv.

``xray-index --output_dir DIR (--dicom_root DIR | --dicom_glob GLOB | --dicomweb_url URL)
[--modality CR,DX] [--body_part CHEST] [--study_date A-B] [--study_uid UID,...]
[--labels CSV --labels_key COLUMN [--label_column Abnormal]] [Beam options]``
(also ``python -m beam_pipelines.index``).

The job is ``ReadArchive | IndexedRows | [JoinLabels] | WriteIndex``
(:mod:`beam_pipelines.transforms.indexing`): list the inputs (files below a
folder, a glob's files, a PACS' studies via QIDO-RS), read each header in
parallel (never the pixels) or list each study's instances, filter, reject
later copies of an instance, join the labels, and write, in
(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) order:

- ``DIR/metadata.csv``: the metadata contract's columns, then the index's
  (``contracts.metadata.INDEX_COLUMNS``); xray-preprocess and xray-score read
  it with ``--archive_root`` the indexed root (or ``--dicomweb_url``);
- ``DIR/summary.json``, ``DIR/unmatched_labels.csv``,
  ``DIR/rejects/rejects.jsonl`` (:mod:`beam_pipelines.contracts.index`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

import apache_beam as beam

from beam_pipelines.cli import main as cli_main
from beam_pipelines.cli import refuse
from beam_pipelines.contracts import index as ix
from beam_pipelines.contracts import metadata as md
from beam_pipelines.contracts.metadata import MetadataError
from beam_pipelines.options import add_dicomweb_arguments, checked_dicomweb, pipeline_options
from beam_pipelines.options import dicomweb_settings as settings_from
from beam_pipelines.storage.committer import open_output
from beam_pipelines.storage.files import flagged_input_problem, is_local, local_path, write_json
from beam_pipelines.transforms.indexing import (
    INDEX_COLUMNS,
    IndexedRows,
    ReadArchive,
    WriteIndex,
    glob_root,
)
from beam_pipelines.transforms.labels import JoinLabels
from beam_pipelines.transforms.ordered import concatenate_parts, parts_of, read_counts
from beam_pipelines.transforms.rows import check_metadata

logger = logging.getLogger(__name__)
_COUNTS = ".counts.json"


def build_parser() -> argparse.ArgumentParser:
    """The job's own flags; everything else goes to Beam's PipelineOptions."""
    parser = argparse.ArgumentParser(
        prog="xray-index",
        description="Index a DICOM archive (a folder, a glob or bucket, a DICOMweb PACS) into "
        "metadata.csv (unknown flags are Beam pipeline options, e.g. --runner).",
    )
    parser.add_argument(
        "--output_dir", required=True, help="Where metadata.csv, summary.json, ... go."
    )
    source = parser.add_argument_group("source (exactly one)")
    source.add_argument("--dicom_root", help="A folder: every file below it is indexed.")
    source.add_argument("--dicom_glob", help="A glob of files, e.g. 'gs://b/archive/**.dcm'.")
    add_dicomweb_arguments(parser)
    filters = parser.add_argument_group("filters (an instance must match every one given)")
    filters.add_argument("--modality", help="Modalities, e.g. CR,DX.")
    filters.add_argument("--body_part", help="BodyPartExamined values, e.g. CHEST.")
    filters.add_argument("--study_date", help="A StudyDate range: 20200101-20231231, A-, -B.")
    filters.add_argument("--study_uid", help="StudyInstanceUIDs, comma-separated.")
    labels = parser.add_argument_group("labels")
    labels.add_argument("--labels", help="A CSV with a key column and a label column.")
    labels.add_argument("--labels_key", choices=ix.LABEL_KEYS, help="The column to join on.")
    labels.add_argument(
        "--label_column", default=md.ABNORMAL, help="The label's column (default %(default)s)."
    )
    parser.add_argument(
        "--verbose", action="store_true", help="On failure, show the full traceback."
    )
    return parser


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the index job; returns the summary written to ``<output_dir>/summary.json``."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    plan = _preflight(parser, args)
    options = pipeline_options(beam_args)
    # Locked and checked before any work; written to a private work folder
    # that replaces the previous index only once complete.
    inputs = tuple(x for x in (args.labels, args.dicom_root) if x)
    output = open_output("--output_dir", args.output_dir, "xray-index", inputs=inputs)
    with output:
        out = output.job_path
        with beam.Pipeline(options=options) as pipeline:
            outcomes = pipeline | "Read" >> ReadArchive(plan["filters"], **plan["source"])
            rows, rejects, filtered = outcomes | "Index" >> IndexedRows()
            if args.labels:
                rows, unmatched = rows | "Labels" >> JoinLabels(
                    args.labels, args.labels_key, args.label_column
                )
            else:
                unmatched = pipeline | "NoLabels" >> beam.Create([])
            _ = (rows, rejects, filtered, unmatched) | "Write" >> WriteIndex(
                out, f"{out}/{_COUNTS}", bool(args.labels)
            )
        summary = _finish(out, plan, args)
        output.commit_unless_empty(
            summary["indexed"],
            f"nothing was indexed: {summary['inputs']} inputs, rejected "
            f"{json.dumps(summary['rejected_by_reason'])}, filtered out {summary['filtered_out']}",
            rejects=ix.REJECTS_FILE,
            last=ix.SUMMARY_FILE,
        )
    logger.info(
        "Indexed %d of %d inputs (%d rejected, %d filtered out)",
        summary["indexed"],
        summary["inputs"],
        summary["rejected"],
        summary["filtered_out"],
    )
    return summary


def _finish(out: str, plan: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Concatenates the parts into the index's files, writes summary.json (driver, streaming)."""
    from beam_pipelines.storage.files import delete

    headers = {
        ix.METADATA_FILE: md.format_row(INDEX_COLUMNS),
        ix.REJECTS_FILE: "",
        ix.UNMATCHED_FILE: md.format_row(ix.UNMATCHED_COLUMNS),
    }
    for name, header in headers.items():
        parts = parts_of(f"{out}/{name}")
        concatenate_parts(f"{out}/{name}", header, parts)
        delete(parts)
    counts = read_counts(f"{out}/{_COUNTS}")
    delete([f"{out}/{_COUNTS}"])
    labels = None
    if args.labels:
        labels = {"file": args.labels, "key": args.labels_key, "column": args.label_column}
    summary = ix.build_summary(counts, plan["described"], plan["filters"], labels)
    write_json(f"{out}/{ix.SUMMARY_FILE}", summary)
    return summary


def _source(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The source's ReadArchive arguments and its description for summary.json."""
    flags = {"--dicom_root": args.dicom_root, "--dicom_glob": args.dicom_glob}
    given = [
        flag for flag, value in {**flags, "--dicomweb_url": args.dicomweb_url}.items() if value
    ]
    if len(given) != 1:
        parser.error(
            "give exactly one source: --dicom_root, --dicom_glob or --dicomweb_url"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if args.dicom_root:
        root = args.dicom_root.rstrip("/") or "/"
        if is_local(root):
            root = os.path.abspath(local_path(root))
            if not os.path.isdir(root):
                refuse(parser.prog, f"--dicom_root {args.dicom_root}: not a folder")
            output = os.path.realpath(local_path(args.output_dir))
            if output == os.path.realpath(root) or output.startswith(os.path.realpath(root) + "/"):
                # Its files (and a rerun's work folder) would be indexed as rejects.
                refuse(parser.prog, "--output_dir lies inside --dicom_root: choose one outside it")
        described = {"kind": "folder", "archive_root": root, "dicomweb_url": None}
        return {"source": {"folder": root, "root": root}, "described": described}
    if args.dicom_glob:
        pattern = args.dicom_glob
        if is_local(pattern):
            pattern = os.path.abspath(local_path(pattern))
        root = glob_root(pattern)
        described = {"kind": "glob", "archive_root": root, "dicomweb_url": None}
        return {"source": {"glob": pattern, "root": root}, "described": described}
    checked_dicomweb(parser, args)  # one clear line (exit 2) when the server does not answer
    settings = settings_from(args)
    described = {"kind": "dicomweb", "archive_root": None, "dicomweb_url": args.dicomweb_url}
    return {"source": {"settings": settings}, "described": described}


def _preflight(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Checks every flag and input before any work (exit 2 with the reason); returns the plan."""
    try:
        filters = ix.Filters.parse(args.modality, args.body_part, args.study_date, args.study_uid)
    except ValueError as exc:
        parser.error(str(exc))
    if bool(args.labels) != bool(args.labels_key):
        parser.error("--labels and --labels_key go together")
    problem = flagged_input_problem([("--labels", args.labels)])
    if problem:
        refuse(parser.prog, problem)
    if args.labels:
        try:
            check_metadata(args.labels, (args.labels_key, args.label_column))
        except MetadataError as exc:
            message = str(exc).replace("metadata.csv", "the labels file")
            refuse(parser.prog, f"--labels {args.labels}: {message}")
    plan = _source(parser, args)
    plan["filters"] = filters
    return plan


def _describe(summary: dict[str, Any]) -> str:
    source = summary["source"]
    use = (
        f"--archive_root {source['archive_root']}"
        if source["archive_root"]
        else f"--dicomweb_url {source['dicomweb_url']}"
    )
    labels = summary["labels"]
    labelled = (
        f", {labels['labelled']} labelled, {labels['unlabelled']} unlabelled, "
        f"{labels['unmatched']} labels unmatched"
        if labels
        else ""
    )
    return (
        f"xray-index: {summary['inputs']} inputs -> {summary['indexed']} indexed{labelled}, "
        f"{summary['rejected']} rejected {json.dumps(summary['rejected_by_reason'])}, "
        f"{summary['filtered_out']} filtered out; pass {use} to xray-preprocess/xray-score"
    )


def main() -> None:
    """Console entry point: ``xray-index``."""
    cli_main("xray-index", run, _describe)


if __name__ == "__main__":
    main()
