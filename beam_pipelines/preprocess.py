"""Preprocessing job: metadata.csv + DICOMs -> patient-split TFRecord shards.

``xray-preprocess --metadata PATH --output_dir DIR [options] [Beam options]``
(also ``python -m beam_pipelines.preprocess``).

Stages: ReadMetadata -> ValidateRows -> RejectDuplicatePaths -> DecodeDicom
-> AssignSplits -> Serialize -> WriteShards, plus WriteRejects, WriteSplits
and WriteManifest. Every input row ends in exactly one place: a shard or a
reject record. Runs on any Beam runner; with none given it uses the local
FnApiRunner in multi-processing mode on all cores (the 2.77 DirectRunner
would first try to download the Prism runner binary).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipelines import dicom, malloc_tuning
from beam_pipelines.cli import main as cli_main
from beam_pipelines.cli import refuse
from beam_pipelines.contracts import records, splits
from beam_pipelines.contracts.metadata import MetadataError
from beam_pipelines.contracts.rejects import INTERNAL_ERROR, internal_error_detail, reject
from beam_pipelines.options import (
    add_decode_arguments,
    add_input_arguments,
    allowed_schemes,
    decode_options,
    pipeline_options,
)
from beam_pipelines.privacy import (
    Pseudonymizer,
    add_pseudonymize_arguments,
    pseudonymizer_from_args,
)
from beam_pipelines.storage import sharding, staging, tfrecord
from beam_pipelines.storage.committer import open_output
from beam_pipelines.storage.files import (
    flagged_input_problem,
    remove_matching,
    remove_tree,
    write_text,
)
from beam_pipelines.storage.paths import archive_root_for
from beam_pipelines.transforms.outcomes import (
    KEPT,
    REJECTED,
    Progress,
    SplitOutcomes,
    WriteRejects,
    block_parts,
)
from beam_pipelines.transforms.rows import (
    ReadMetadataFn,
    RejectDuplicatePaths,
    ValidateRowFn,
    ValidRow,
    check_metadata,
)

logger = logging.getLogger(__name__)


def make_record(
    row: ValidRow,
    options: dicom.DecodeOptions,
    resize_policy: dicom.ResizePolicy,
    pseudonymizer: Pseudonymizer | None = None,
) -> dict[str, Any]:
    """Decodes a row's DICOM into a schema record (224x224x1 image + metadata).

    With a pseudonymizer the row's identifiers are already pseudonyms; the
    header's SOP Instance UID is replaced here.

    Raises:
        dicom.DicomRejected: for every per-file problem.
    """
    image, decoded = dicom.decode_model_input(row.resolved_path, options, policy=resize_policy)
    header = decoded.header
    return {
        "row": row.row,
        "image": image,
        "label": int(bool(row.abnormal)),
        "patient_id": row.patient_id,
        "study_id": row.study_id,
        "dicom_path": row.dicom_path,
        "view_position": row.view_position or header.view_position,
        # metadata.csv wins; the header fills what the CSV leaves unknown.
        "age": row.age if row.age is not None else header.patient_age,
        "sex": row.sex or header.patient_sex or "",
        "original_rows": header.rows,
        "original_columns": header.columns,
        "sop_instance_uid": (
            pseudonymizer(header.sop_instance_uid) if pseudonymizer else header.sop_instance_uid
        ),
        "extra": row.extra,
        "_inverted": decoded.inverted,
        "_intensity": decoded.voi,
        "_decode_path": decoded.path,
    }


RECORDS_PER_SHARD = 1000


def shard_count(records: int, num_shards: int) -> int:
    """Shards for a split: the fixed number asked for, else one per RECORDS_PER_SHARD."""
    return sharding.shard_count(records, num_shards, RECORDS_PER_SHARD)


def pixel_sums(stored: np.ndarray) -> tuple[int, int, int]:
    """Exact (sum, sum of squares, count) of stored 16-bit pixel values.

    The squares' sum stays below 2**53 for any image of fewer than 2**21
    pixels, so float64 arithmetic is exact here and ~7x faster than uint64.
    """
    values = stored.astype(np.float64).ravel()
    return int(stored.sum(dtype=np.uint64)), int(values @ values), values.size


class DecodeAndStageFn(beam.DoFn):
    """Decodes one row, stages its compressed record, emits a small summary.

    Only the summary (row, split, shard, staged chunk's reference, label,
    pixel sums) travels on: images never cross a stage boundary, so no runner
    has to hold them in memory, whatever the archive's size.
    """

    def __init__(
        self,
        options: dicom.DecodeOptions,
        resize_policy: dicom.ResizePolicy,
        staging_dir: str,
        num_shards: int,
        pseudonymizer: Pseudonymizer | None = None,
    ) -> None:
        self._options = options
        self._resize_policy = resize_policy
        self._staging_dir = staging_dir
        self._num_shards = num_shards
        self._pseudonymizer = pseudonymizer

    def setup(self) -> None:
        malloc_tuning.keep_freed_buffers()
        self._progress = Progress("decoded and staged images")
        self._stager = staging.BundleStager(self._staging_dir)

    def start_bundle(self) -> None:
        # A bundle that failed before finish_bundle left its file open; its
        # chunks are referenced by nothing, so failing to close it is no error.
        try:
            self._stager.close()
        except OSError as exc:
            logger.warning("could not close an abandoned staging file: %s", exc)

    def finish_bundle(self) -> None:
        self._stager.close()

    def teardown(self) -> None:
        self._stager.close()

    def process(
        self, row: ValidRow, assignment: dict[str, str], sizes: dict[str, int]
    ) -> Iterator[Any]:
        self._progress.tick()
        try:
            record = make_record(row, self._options, self._resize_policy, self._pseudonymizer)
        except dicom.DicomRejected as rejected:
            Metrics.counter(self.__class__, f"rejected_{rejected.reason}").inc()
            yield (
                REJECTED,
                reject(row.row, row.dicom_path, "decode", rejected.reason, rejected.detail),
            )
            return
        except MemoryError:
            raise
        except Exception as exc:  # a bug on one input: that input is rejected, the job goes on
            Metrics.counter(self.__class__, f"rejected_{INTERNAL_ERROR}").inc()
            detail = internal_error_detail(exc, "decode", row.row)
            yield REJECTED, reject(row.row, row.dicom_path, "decode", INTERNAL_ERROR, detail)
            return
        Metrics.counter(self.__class__, "decoded").inc()
        if record.pop("_inverted"):
            Metrics.counter(self.__class__, "monochrome1_inverted").inc()
        Metrics.counter(self.__class__, f"intensity_{record.pop('_intensity')}").inc()
        Metrics.counter(self.__class__, f"decode_path_{record.pop('_decode_path')}").inc()
        split = assignment[row.patient_id]
        shards = shard_count(sizes[split], self._num_shards)
        shard = sharding.shard_of(row.dicom_path, shards)
        # Quantized once: the record stores these values and the statistics sum them.
        record["image"] = records.quantize(record["image"])
        # Compressed here, in parallel: the shard writer only concatenates.
        staged = self._stager.append(tfrecord.compress_record(records.serialize(record)))
        sums = pixel_sums(record["image"]) if split == "train" else (0, 0, 0)
        yield (
            KEPT,
            {
                "row": row.row,
                "split": split,
                "label": record["label"],
                "shard": (split, shard, shards),
                "staged": staged,
                "pixel_sums": sums,
            },
        )


class WriteShards(beam.PTransform):
    """Writes ``<out>/<split>/part-SSSSS-of-NNNNN.tfrecord.gz``, byte-identical on reruns.

    Records go to a shard by a hash of their path and are ordered inside it
    by a keyed hash of their metadata row (a stable shuffle: an archive
    listed label by label would otherwise give shards, and so training
    batches, of one label at a time), so the files do not depend on the
    runner or on bundle order; each file appears atomically (temporary
    name, then rename). Every shard of a non-empty split is written, even
    one that hashing left empty.
    Only (row, staged chunk reference) pairs are grouped; the writer streams
    the staged records (already compressed by the decode stage) into the
    shard. Staged files are shared by many shards and a runner may retry or
    recompute a writer, so the job removes them after the run, not here.
    """

    def __init__(self, out: str, num_shards: int, sizes: beam.PCollection, seed: int = 0) -> None:
        """sizes: a one-element {split: rows} dict, the counts the decoder sharded by."""
        super().__init__()
        self._out, self._num_shards, self._sizes, self._seed = out, num_shards, sizes, seed

    def expand(self, summaries: beam.PCollection) -> beam.PCollection:
        num_shards = self._num_shards
        keyed = summaries | "KeyByShard" >> beam.Map(
            lambda s: (s["shard"], (s["row"], s["staged"]))
        )
        every_shard = (
            summaries
            | "SplitName" >> beam.Map(lambda s: s["split"])
            | "DistinctSplits" >> beam.Distinct()
            | "ShardsOfSplit"
            >> beam.FlatMap(
                lambda split, sizes: [
                    ((split, k, shard_count(sizes[split], num_shards)), None)
                    for k in range(shard_count(sizes[split], num_shards))
                ],
                pvalue.AsSingleton(self._sizes),
            )
        )
        return (
            (keyed, every_shard)
            | "WithEmptyShards" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShardFn(self._out, self._seed))
        )


class _WriteShardFn(beam.DoFn):
    def __init__(self, out: str, seed: int) -> None:
        self._out, self._seed = out, seed

    def process(self, element: tuple[tuple[str, int, int], Iterable[Any]]) -> Iterator[str]:
        (split, shard, shards), values = element
        ordered = sorted(
            (splits.order_key(self._seed, str(row)), ref) for row, ref in filter(None, values)
        )
        staged = [ref for _, ref in ordered]
        path = f"{self._out}/{split}/part-{shard:05d}-of-{shards:05d}.tfrecord.gz"
        with contextlib.closing(staging.read_chunks(staged)) as chunks:
            written = tfrecord.write_compressed_gz(path, chunks)
        Metrics.counter(self.__class__, f"written_{split}").inc(written)
        yield path


def _patient_rows(row: ValidRow) -> tuple[str, tuple[bool, int]]:
    return row.patient_id, (bool(row.abnormal), 1)


def _any_abnormal_and_rows(values: Iterable[tuple[bool, int]]) -> tuple[bool, int]:
    """Combines (abnormal, rows) pairs of one patient; associative, so partials combine too."""
    abnormal, rows = False, 0
    for value_abnormal, value_rows in values:
        abnormal, rows = abnormal or value_abnormal, rows + value_rows
    return abnormal, rows


def _plan_splits(
    patients: list[tuple[str, tuple[bool, int]]],
    ratios: tuple[float, float, float],
    seed: int,
    pinned: dict[str, str],
) -> dict[str, dict[str, Any]]:
    assignment = splits.assign_splits(
        ((patient, abnormal) for patient, (abnormal, _) in patients), ratios, seed, pinned
    )
    rows: dict[str, int] = {}
    for patient, (_, count) in patients:
        rows[assignment[patient]] = rows.get(assignment[patient], 0) + count
    return {"assignment": assignment, "rows": rows}


class AssignSplits(beam.PTransform):
    """Computes PatientID -> split, and the rows each split gets, from one record per patient.

    Works on the validated rows, before decoding, so the assignment is ready
    when images are decoded; a patient whose every image later fails to
    decode still has a place in splits.csv. Yields one dict:
    ``{"assignment": {PatientID: split}, "rows": {split: rows}}`` (the row
    counts fix each split's shard count before any image is decoded).
    """

    def __init__(self, ratios: tuple[float, float, float], seed: int, pinned: dict[str, str]):
        super().__init__()
        self._ratios, self._seed, self._pinned = ratios, seed, pinned

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        ratios, seed, pinned = self._ratios, self._seed, self._pinned
        return (
            records
            | "PatientRows" >> beam.Map(_patient_rows)
            | "PerPatient" >> beam.CombinePerKey(_any_abnormal_and_rows)
            | "AllPatients" >> beam.combiners.ToList()
            | "Assign" >> beam.Map(_plan_splits, ratios, seed, pinned)
        )


class _KeptStats(beam.CombineFn):
    """Kept records per split x label, and mean/std of the stored training pixels.

    Pixel sums are exact integers over the 16-bit stored values, so the
    result does not depend on how a runner splits and merges the work.
    """

    def create_accumulator(self) -> tuple[dict[str, int], int, int, int]:
        return {}, 0, 0, 0

    def add_input(
        self, acc: tuple[dict[str, int], int, int, int], summary: dict[str, Any]
    ) -> tuple[dict[str, int], int, int, int]:
        counts, total, squares, pixels = acc
        key = f"{summary['split']}/{'abnormal' if summary['label'] else 'normal'}"
        counts[key] = counts.get(key, 0) + 1
        add_total, add_squares, add_pixels = summary["pixel_sums"]
        return counts, total + add_total, squares + add_squares, pixels + add_pixels

    def merge_accumulators(
        self, accs: Iterable[tuple[dict[str, int], int, int, int]]
    ) -> tuple[dict[str, int], int, int, int]:
        merged: dict[str, int] = {}
        total = squares = pixels = 0
        for counts, add_total, add_squares, add_pixels in accs:
            for key, count in counts.items():
                merged[key] = merged.get(key, 0) + count
            total, squares, pixels = total + add_total, squares + add_squares, pixels + add_pixels
        return merged, total, squares, pixels

    def extract_output(self, acc: tuple[dict[str, int], int, int, int]) -> dict[str, Any]:
        counts, total, squares, pixels = acc
        if pixels == 0:
            return {"counts": counts, "pixels": {"mean": None, "std": None, "pixels": 0}}
        scale = float(2**records.IMAGE_BITS - 1)
        mean = total / pixels
        variance = max(squares / pixels - mean * mean, 0.0)
        stats = {"mean": mean / scale, "std": variance**0.5 / scale, "pixels": pixels}
        return {"counts": counts, "pixels": stats}


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
    try:
        ratios = splits.parse_ratios(args.split)
    except ValueError as exc:
        parser.error(str(exc))
    problem = flagged_input_problem(
        [("--metadata", args.metadata), ("--pin_splits", args.pin_splits)]
    )
    if problem:
        refuse(parser.prog, problem)
    archive_root = archive_root_for(args.metadata, args.archive_root)
    pinned: dict[str, str] = {}
    if args.pin_splits:
        with FileSystems.open(args.pin_splits) as handle:
            pinned = splits.read_splits_csv(handle.read().decode("utf-8"))
    try:
        schemes = allowed_schemes(args, archive_root, args.metadata)
    except ValueError as exc:
        parser.error(f"--allowed_schemes: {exc}")
    # Fail fast, before any work (and before an earlier run's outputs are
    # replaced), on a CSV that cannot be used at all: exit 2 with the reason.
    try:
        check_metadata(args.metadata)
    except MetadataError as exc:
        parser.error(f"--metadata {args.metadata}: {exc}")

    try:
        pseudonymizer = pseudonymizer_from_args(args)
    except ValueError as exc:
        parser.error(f"pseudonymization: {exc}")

    decoding = decode_options(args)
    options = pipeline_options(beam_args)
    # Locked and checked before any work; everything is written to a private
    # work folder that replaces the previous output only once complete.
    output = open_output(
        "--output_dir",
        args.output_dir,
        "xray-preprocess",
        inputs=(args.metadata, archive_root),
    )
    with output:
        manifest = _run_pipeline(
            args,
            options,
            output.job_path,
            archive_root,
            ratios,
            pinned,
            schemes,
            pseudonymizer,
            decoding,
        )
        output.commit_unless_empty(
            manifest["kept"],
            f"no row was kept: {manifest['input_rows']} rows, rejected "
            f"{json.dumps(manifest['rejected_by_reason'])}",
            rejects="rejects/rejects.jsonl",
            last="manifest.json",
        )
    logger.info(
        "Preprocessed %d rows: %d kept, %d rejected -> %s",
        manifest["input_rows"],
        manifest["kept"],
        manifest["rejected"],
        args.output_dir,
    )
    return manifest


def _run_pipeline(
    args: argparse.Namespace,
    options: Any,
    out: str,
    archive_root: str,
    ratios: tuple[float, float, float],
    pinned: dict[str, str],
    schemes: Any,
    pseudonymizer: Pseudonymizer | None,
    decoding: dicom.DecodeOptions,
) -> dict[str, Any]:
    """Runs the Beam pipeline into ``out`` (the work folder); returns the manifest."""
    rejects_file = f"{out}/rejects/rejects.jsonl"
    with beam.Pipeline(options=options) as pipeline:
        rows = (
            pipeline
            | "MetadataPath" >> beam.Create([args.metadata])
            | "ReadMetadata" >> beam.ParDo(ReadMetadataFn())
            | "Spread" >> beam.Reshuffle()
        )
        valid, invalid = (
            rows
            | "ValidateRows" >> beam.ParDo(ValidateRowFn(archive_root, allowed_schemes=schemes))
            | "RouteValidated" >> SplitOutcomes()
        )
        if pseudonymizer is not None:
            # From here on every identifier is a pseudonym: splits, records,
            # rejects and shard placement never see the originals.
            valid = valid | "PseudonymizeRows" >> beam.Map(pseudonymizer.row)
            invalid = invalid | "PseudonymizeRejects" >> beam.Map(pseudonymizer.record)
        unique, duplicates = (
            valid
            | "RejectDuplicatePaths" >> RejectDuplicatePaths()
            | "RouteUnique" >> SplitOutcomes()
        )
        plan = unique | "AssignSplits" >> AssignSplits(ratios, args.seed, pinned)
        assignment = plan | "Assignment" >> beam.Map(lambda p: p["assignment"])
        sizes = plan | "RowsPerSplit" >> beam.Map(lambda p: p["rows"])
        staging_dir = f"{out}/.staging"
        summaries, undecodable = (
            unique
            | "DecodeDicom"
            >> beam.ParDo(
                DecodeAndStageFn(
                    decoding, args.resize_policy, staging_dir, args.num_shards, pseudonymizer
                ),
                pvalue.AsSingleton(assignment),
                pvalue.AsSingleton(sizes),
            )
            | "RouteDecoded" >> SplitOutcomes()
        )
        shard_paths = summaries | "WriteShards" >> WriteShards(
            out, args.num_shards, sizes, args.seed
        )
        rejects = (invalid, duplicates, undecodable) | "AllRejects" >> beam.Flatten()
        rejects_path = rejects | "WriteRejects" >> WriteRejects(rejects_file)
        splits_path = assignment | "WriteSplits" >> beam.Map(
            lambda a: write_text(f"{out}/splits.csv", splits.format_splits_csv(a))
        )

        kept_stats = summaries | "KeptStats" >> beam.CombineGlobally(_KeptStats())
        reject_counts = (
            rejects
            | "Reason" >> beam.Map(lambda r: r["reason"])
            | "CountRejects" >> beam.combiners.Count.PerElement()
            | "RejectDict" >> beam.combiners.ToDict()
        )
        input_rows = rows | "CountInput" >> beam.combiners.Count.Globally()
        settings = {
            "metadata": args.metadata,
            "archive_root": archive_root,
            "allowed_schemes": sorted(schemes),
            "split": list(ratios),
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
        # Written last and only after every other output exists (its side
        # inputs are their paths): a manifest.json means a complete output.
        _ = input_rows | "WriteManifest" >> beam.Map(
            _build_manifest,
            settings,
            out,
            pvalue.AsSingleton(kept_stats),
            pvalue.AsSingleton(reject_counts),
            pvalue.AsList(shard_paths),
            pvalue.AsSingleton(rejects_path),
            pvalue.AsSingleton(splits_path),
        )
    # Not inside the pipeline: staged chunks feed every shard writer, which a
    # runner may retry or recompute, and on Dask only the manifest's branch runs.
    remove_tree(staging_dir)
    remove_matching([block_parts(rejects_file)])
    with FileSystems.open(f"{out}/manifest.json") as handle:
        return json.loads(handle.read().decode("utf-8"))


def _build_manifest(
    input_rows: int,
    settings: dict[str, Any],
    out: str,
    kept_stats: dict[str, Any],
    rejected: dict[str, int],
    shard_paths: list[str],
    rejects_path: str,
    splits_path: str,
) -> str:
    from importlib.metadata import version

    kept = kept_stats["counts"]
    per_split = {
        name: {label: kept.get(f"{name}/{label}", 0) for label in ("normal", "abnormal")}
        for name in splits.SPLITS
    }
    manifest: dict[str, Any] = {
        "schema_version": records.SCHEMA_VERSION,
        "image": {
            "shape": list(records.IMAGE_SHAPE),
            "stored_bits": records.IMAGE_BITS,
            "range": [0, 1],
        },
        "input_rows": input_rows,
        "kept": sum(kept.values()),
        "rejected": sum(rejected.values()),
        "counts": per_split,
        "rejected_by_reason": dict(sorted(rejected.items())),
        "files": {
            "shards": sorted(posixpath.relpath(p, out) for p in shard_paths),
            "rejects": posixpath.relpath(rejects_path, out),
            "splits": posixpath.relpath(splits_path, out),
        },
        "train_pixel_stats": kept_stats["pixels"],
        "options": settings,
        "versions": {
            "python": platform.python_version(),
            # Package metadata, not imports: workers never load TensorFlow.
            **{name: version(name) for name in ("apache-beam", "tensorflow", "pydicom", "numpy")},
        },
    }
    if manifest["kept"] + manifest["rejected"] != input_rows:
        # Should be impossible; say so loudly rather than write a wrong manifest.
        raise RuntimeError(
            f"row accounting broken: {manifest['kept']} kept + {manifest['rejected']} "
            f"rejected != {input_rows} input rows"
        )
    return write_text(f"{out}/manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")


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
