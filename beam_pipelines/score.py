"""Batch scoring job: a trained model over a whole archive.

``xray-score --model RESULTS/model (--metadata CSV | --dicom_glob GLOB | --data_dir DIR)
--output PREFIX [--batch_size N] [Beam options]`` (also ``python -m beam_pipelines.score``).

Inputs: a metadata.csv (labels optional), a glob of DICOM files (the header
fills PatientID, StudyID, view, age and sex), or preprocessed shards. DICOM
inputs are decoded and resized with exactly the functions preprocessing uses
and quantized as a record stores them, so an image scores the same from its
DICOM file and from its shard. The model runs under ``RunInference`` (batched,
one model per worker process). Outputs:

- ``PREFIX-SSSSS-of-NNNNN.parquet``: the predictions contract
  (``beam_pipelines.contracts.predictions``), rows sorted by path within hash-assigned
  shards, each file written atomically;
- ``<dir of PREFIX>/rejects/<name>.jsonl``: inputs that could not be scored,
  with reasons;
- ``PREFIX.summary.json``: inputs = scored + rejected, per reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from beam_pipelines import dicom, malloc_tuning
from beam_pipelines.cli import main as cli_main
from beam_pipelines.cli import refuse
from beam_pipelines.contracts import records
from beam_pipelines.contracts.metadata import SCORING_REQUIRED_COLUMNS, MetadataError
from beam_pipelines.contracts.rejects import INTERNAL_ERROR, internal_error_detail, reject
from beam_pipelines.options import (
    add_decode_arguments,
    add_input_arguments,
    allowed_schemes,
    decode_options,
    pipeline_options,
)
from beam_pipelines.privacy import add_pseudonymize_arguments, pseudonymizer_from_args
from beam_pipelines.storage import tfrecord
from beam_pipelines.storage.committer import open_output
from beam_pipelines.storage.files import (
    atomic_create,
    flagged_input_problem,
    remove_matching,
    write_text,
)
from beam_pipelines.storage.paths import archive_root_for
from beam_pipelines.storage.sharding import shard_count, shard_of
from beam_pipelines.transforms.inference import (
    InferenceError,
    KerasModelHandler,
    model_file_problem,
)
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

ROWS_PER_SHARD = 200_000
_META_KEYS = ("dicom_path", "patient_id", "study_id", "view_position", "age", "sex", "label")


def _meta(**values: Any) -> dict[str, Any]:
    """The prediction columns known before scoring (blank strings become null)."""
    meta = {key: values.get(key) for key in (*_META_KEYS, "split", "row")}
    for key in ("patient_id", "study_id", "view_position", "sex"):
        meta[key] = meta[key] or None
    return meta


class DecodeForScoringFn(beam.DoFn):
    """DICOM (from a metadata row or a bare path) -> (meta, model input) or a reject."""

    def __init__(self, options: dicom.DecodeOptions, resize_policy: dicom.ResizePolicy) -> None:
        self._options = options
        self._resize_policy = resize_policy

    def setup(self) -> None:
        malloc_tuning.keep_freed_buffers()
        self._progress = Progress("decoded images")

    def process(self, element: ValidRow | str) -> Iterator[Any]:
        self._progress.tick()
        row = element if isinstance(element, ValidRow) else None
        path = row.resolved_path if row else str(element)
        shown = row.dicom_path if row else path
        try:
            model_image, decoded = dicom.decode_model_input(
                path, self._options, policy=self._resize_policy
            )
        except dicom.DicomRejected as rejected:
            Metrics.counter(self.__class__, f"rejected_{rejected.reason}").inc()
            yield (
                REJECTED,
                reject(row.row if row else None, shown, "decode", rejected.reason, rejected.detail),
            )
            return
        except MemoryError:
            raise
        except Exception as exc:  # a bug on one input: that input is rejected, the job goes on
            Metrics.counter(self.__class__, f"rejected_{INTERNAL_ERROR}").inc()
            number = row.row if row else None
            detail = internal_error_detail(exc, "decode", number)
            yield REJECTED, reject(number, shown, "decode", INTERNAL_ERROR, detail)
            return
        header = decoded.header
        image = records.as_stored(model_image)
        meta = _meta(
            dicom_path=shown,
            row=row.row if row else None,
            patient_id=(row.patient_id if row else "") or header.patient_id,
            study_id=(row.study_id if row else "") or header.study_id,
            view_position=(row.view_position if row else "") or header.view_position,
            age=row.age if row and row.age is not None else header.patient_age,
            sex=(row.sex if row else None) or header.patient_sex,
            label=None if row is None or row.abnormal is None else int(row.abnormal),
        )
        Metrics.counter(self.__class__, "decoded").inc()
        Metrics.counter(self.__class__, f"decode_path_{decoded.path}").inc()
        yield KEPT, (meta, image)


class ReadShardsFn(beam.DoFn):
    """A preprocessed shard -> (KEPT, (meta, image)) per record; the split is the folder name.

    A shard that cannot be read to its end (truncated, corrupt gzip, failed
    checksum, unparsable record) becomes one ``corrupt_shard`` reject that
    says how many of its records were read first (those are scored); the
    job goes on with the other shards.
    """

    def process(self, path: str) -> Iterator[tuple[str, Any]]:
        split = posixpath.basename(posixpath.dirname(path))
        read = 0
        try:
            for serialized in tfrecord.read_tfrecord_gz(path):
                record = records.parse_example(serialized)
                meta = _meta(split=split, **{k: record[k] for k in _META_KEYS})
                read += 1
                yield KEPT, (meta, record["image"])
        except MemoryError:
            raise
        except Exception as exc:  # whatever the file holds, the other shards go on
            Metrics.counter(self.__class__, "rejected_corrupt_shard").inc()
            detail = (
                f"{type(exc).__name__}: {dicom.redact(exc)}; {read} records read before it "
                "(scored); the rest of the shard is lost"
            )
            logger.warning("Shard %s is corrupt after %d records: %s", path, read, detail)
            yield REJECTED, reject(None, path, "read_shard", "corrupt_shard", detail)


class ScoreImages(beam.PTransform):
    """(meta, image) -> (meta, PredictionResult) with the model handler.

    ``RunInference``: batched, one model per worker process, on every runner
    (the project's DaskRunner keeps the last batch each bundle flushes in
    ``finish_bundle``, which Beam 2.77's own DaskRunner dropped).
    """

    def __init__(self, handler: KerasModelHandler) -> None:
        super().__init__()
        self._handler = handler

    def expand(self, examples: beam.PCollection) -> beam.PCollection:
        return examples | "RunInference" >> RunInference(KeyedModelHandler(self._handler))


class _ToPredictionFn(beam.DoFn):
    def __init__(self, model_id: str, threshold: float | None) -> None:
        self._model_id = model_id
        self._threshold = threshold

    def process(self, element: tuple[dict[str, Any], Any]) -> Iterator[Any]:
        meta, result = element
        score = result.inference
        if isinstance(score, InferenceError):
            Metrics.counter(self.__class__, "rejected_inference_failed").inc()
            yield (
                REJECTED,
                reject(meta["row"], meta["dicom_path"], "score", "inference_failed", score.detail),
            )
            return
        Metrics.counter(self.__class__, "scored").inc()
        prediction = {k: v for k, v in meta.items() if k != "row"}
        value = float(score)
        # The finding at the operating point: the same comparison the trainer makes.
        finding = None if self._threshold is None else int(value >= self._threshold)
        yield KEPT, {**prediction, "score": value, "predicted": finding, "model_id": self._model_id}


class WritePredictions(beam.PTransform):
    """Writes ``PREFIX-SSSSS-of-NNNNN.parquet``: hashed shards, sorted rows, atomic files."""

    def __init__(
        self, prefix: str, num_shards: int, operating_point: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self._prefix, self._num_shards = prefix, num_shards
        self._operating_point = operating_point

    def expand(self, predictions: beam.PCollection) -> beam.PCollection:
        prefix, fixed, point = self._prefix, self._num_shards, self._operating_point
        total = predictions | "CountPredictions" >> beam.combiners.Count.Globally()

        def shards(count: int) -> int:
            return shard_count(count, fixed, ROWS_PER_SHARD)

        keyed = predictions | "KeyByShard" >> beam.Map(
            lambda p, n: ((shard_of(p["dicom_path"], shards(n)), shards(n)), p),
            pvalue.AsSingleton(total),
        )
        every_shard = total | "EveryShard" >> beam.FlatMap(
            lambda n: [((k, shards(n)), None) for k in range(shards(n))]
        )
        return (
            (keyed, every_shard)
            | "WithEmptyShards" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.Map(_write_shard, prefix, point)
        )


def _write_shard(
    element: tuple[tuple[int, int], Iterable[Any]], prefix: str, point: dict[str, Any] | None
) -> str:
    import pyarrow.parquet as pq

    from beam_pipelines.contracts import predictions as contract

    (shard, shards), values = element
    rows = sorted((v for v in values if v is not None), key=lambda p: p["dicom_path"])
    columns = {name: [row.get(name) for row in rows] for name in contract.COLUMNS}
    path = f"{prefix}-{shard:05d}-of-{shards:05d}.parquet"
    with atomic_create(path) as handle:
        pq.write_table(contract.to_table(columns, point), handle)
    return path


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
    parser.add_argument("--output", required=True, help="Output prefix, e.g. predictions/archive.")
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
    parser.add_argument(
        "--verbose", action="store_true", help="On failure, show the full traceback."
    )
    return parser


def _shard_pattern(data_dir: str) -> str:
    """Every split's shards under data_dir (its name literal: 'run?' never matches 'runA')."""
    import glob

    return f"{glob.escape(data_dir.rstrip('/'))}/*/part-*.tfrecord.gz"


def _shards_pseudonym_key(data_dir: str) -> str | None:
    """The key fingerprint preprocessing recorded for these shards, or None."""
    path = f"{data_dir.rstrip('/')}/manifest.json"
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        settings = json.loads(handle.read()).get("options", {})
    return settings.get("pseudonymized")


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
    card = f"{posixpath.dirname(model_dir.rstrip('/'))}/model_card.json"
    if FileSystems.exists(card):
        with FileSystems.open(card) as handle:
            return json.loads(handle.read())["model_id"]
    return posixpath.basename(model_dir.rstrip("/"))


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the scoring job; returns the summary written beside the predictions."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    problem = flagged_input_problem([("--metadata", args.metadata)])
    if problem:
        refuse(parser.prog, problem)
    archive_root = archive_root_for(args.metadata or "", args.archive_root)
    try:
        schemes = allowed_schemes(args, archive_root, args.metadata or "")
    except ValueError as exc:
        parser.error(f"--allowed_schemes: {exc}")
    if args.metadata:
        # Fail fast, before any work (and before an earlier run's outputs are
        # replaced), on a CSV that cannot be used at all: exit 2 with the reason.
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
    if already:
        pseudonymizer = None
    # Last of the checks: it reads the whole model file.
    problem = model_file_problem(args.model)
    if problem:
        refuse(parser.prog, f"--model {args.model}: {problem}")
    model_id = _model_id(args.model, args.model_id)
    try:
        point = _operating_point(args.model, args.threshold)
    except ValueError as exc:
        refuse(parser.prog, str(exc))
    options = decode_options(args)
    beam_options = pipeline_options(beam_args)
    # Locked and checked before any work; the files are written to a private
    # work folder and renamed into place, summary last, once complete.
    output = open_output(
        "--output", args.output, "xray-score", folder=False, inputs=(args.metadata or "",)
    )
    name = output.target.name
    with output:
        summary = _run_pipeline(
            args,
            beam_options,
            output.work,
            name,
            archive_root,
            schemes,
            options,
            pseudonymizer,
            pseudonymized,
            model_id,
            point,
        )
        output.commit_unless_empty(
            summary["scored"],
            f"nothing was scored: {summary['inputs']} inputs, rejected "
            f"{json.dumps(summary['rejected_by_reason'])}",
            rejects=summary["rejects_file"],
            last=f"{name}.summary.json",
        )
    logger.info(
        "Scored %d of %d inputs (%d rejected) -> %s",
        summary["scored"],
        summary["inputs"],
        summary["rejected"],
        args.output,
    )
    return summary


def _run_pipeline(
    args: argparse.Namespace,
    beam_options: Any,
    work: str,
    name: str,
    archive_root: str,
    schemes: Any,
    options: dicom.DecodeOptions,
    pseudonymizer: Any,
    pseudonymized: str | None,
    model_id: str,
    point: dict[str, Any] | None,
) -> dict[str, Any]:
    """Runs the Beam pipeline into the work folder; returns the summary."""
    prefix = f"{work}/{name}"
    rejects_path = f"{work}/rejects/{name}.jsonl"
    summary_path = f"{prefix}.summary.json"
    with beam.Pipeline(options=beam_options) as pipeline:
        rejects: list[beam.PCollection] = []
        if args.data_dir:
            inputs = (
                pipeline
                | "ShardPatterns" >> beam.Create([_shard_pattern(args.data_dir)])
                | "MatchShards" >> fileio.MatchAll()
                | "ShardPaths" >> beam.Map(lambda m: m.path)
                | "SpreadShards" >> beam.Reshuffle()
            )
            read = inputs | "ReadShards" >> beam.ParDo(ReadShardsFn())
            # A corrupt shard counts as one input: its reject balances the summary.
            input_count = read | "CountInputs" >> beam.combiners.Count.Globally()
            examples, unreadable = read | "RouteRead" >> SplitOutcomes()
            rejects.append(unreadable)
        else:
            if args.metadata:
                rows = (
                    pipeline
                    | "MetadataPath" >> beam.Create([args.metadata])
                    | "ReadMetadata" >> beam.ParDo(ReadMetadataFn(SCORING_REQUIRED_COLUMNS))
                    | "Spread" >> beam.Reshuffle()
                )
                valid, invalid = (
                    rows
                    | "ValidateRows"
                    >> beam.ParDo(
                        ValidateRowFn(archive_root, scoring=True, allowed_schemes=schemes)
                    )
                    | "RouteValidated" >> SplitOutcomes()
                )
                sources, duplicates = (
                    valid
                    | "RejectDuplicatePaths" >> RejectDuplicatePaths()
                    | "RouteUnique" >> SplitOutcomes()
                )
                rejects += [invalid, duplicates]
            else:
                rows = sources = (
                    pipeline
                    | "Glob" >> beam.Create([args.dicom_glob])
                    | "MatchFiles" >> fileio.MatchAll()
                    | "FilePaths" >> beam.Map(lambda m: m.path)
                    | "Spread" >> beam.Reshuffle()
                )
            input_count = rows | "CountInputs" >> beam.combiners.Count.Globally()
            examples, undecodable = (
                sources
                | "DecodeDicom" >> beam.ParDo(DecodeForScoringFn(options, args.resize_policy))
                | "RouteDecoded" >> SplitOutcomes()
            )
            rejects.append(undecodable)
        predictions, failed = (
            examples
            | "Score" >> ScoreImages(KerasModelHandler(args.model, args.batch_size))
            | "ToPrediction"
            >> beam.ParDo(_ToPredictionFn(model_id, point["threshold"] if point else None))
            | "RouteScored" >> SplitOutcomes()
        )
        rejects.append(failed)
        all_rejects = tuple(rejects) | "AllRejects" >> beam.Flatten()
        if pseudonymizer is not None:
            # Decoding needed the real paths; nothing written keeps them.
            predictions = predictions | "PseudonymizePredictions" >> beam.Map(pseudonymizer.record)
            all_rejects = all_rejects | "PseudonymizeRejects" >> beam.Map(pseudonymizer.record)
        files = predictions | "WritePredictions" >> WritePredictions(prefix, args.num_shards, point)
        rejects_file = all_rejects | "WriteRejects" >> WriteRejects(rejects_path)
        scored = predictions | "CountScored" >> beam.combiners.Count.Globally()
        by_reason = (
            all_rejects
            | "Reason" >> beam.Map(lambda r: r["reason"])
            | "CountReasons" >> beam.combiners.Count.PerElement()
            | "ReasonDict" >> beam.combiners.ToDict()
        )
        _ = input_count | "WriteSummary" >> beam.Map(
            _write_summary,
            summary_path,
            work,
            model_id,
            point,
            pseudonymized,
            pvalue.AsSingleton(scored),
            pvalue.AsSingleton(by_reason),
            pvalue.AsList(files),
            pvalue.AsSingleton(rejects_file),
        )
    remove_matching([block_parts(rejects_path)])  # after the run: see WriteRejects
    with FileSystems.open(summary_path) as handle:
        return json.loads(handle.read())


def _write_summary(
    inputs: int,
    path: str,
    root: str,
    model_id: str,
    point: dict[str, Any] | None,
    pseudonymized: str | None,
    scored: int,
    by_reason: dict[str, int],
    files: list[str],
    rejects_file: str,
) -> str:
    summary: dict[str, Any] = {
        "inputs": inputs,
        "scored": scored,
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "model_id": model_id,
        "operating_point": point,
        "pseudonymized": pseudonymized,
        # Relative to the folder of --output: the files are written elsewhere first.
        "files": sorted(posixpath.relpath(f, root) for f in files),
        "rejects_file": posixpath.relpath(rejects_file, root),
    }
    if summary["scored"] + summary["rejected"] != inputs:
        raise RuntimeError(
            f"accounting broken: {scored} scored + {summary['rejected']} rejected != {inputs}"
        )
    return write_text(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def _describe(summary: dict[str, Any]) -> str:
    return (
        f"xray-score: {summary['inputs']} inputs -> {summary['scored']} scored, "
        f"{summary['rejected']} rejected {json.dumps(summary['rejected_by_reason'])}"
    )


def main() -> None:
    """Console entry point: ``xray-score``."""
    cli_main("xray-score", run, _describe)


if __name__ == "__main__":
    main()
