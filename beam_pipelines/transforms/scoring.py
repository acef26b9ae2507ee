"""The scoring job's composites: inputs -> (meta, image) examples -> predictions -> files.

:class:`ReadExamples` reads one of the three inputs (preprocessed shards, a
metadata.csv, a glob of DICOM files) into examples and rejects; :class:`Score`
runs the model over them; :class:`WriteScores` writes the Parquet files, the
rejects and, last, the summary.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Collection, Iterator
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io import fileio
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from beam_pipelines import dicom
from beam_pipelines.contracts import predictions, records
from beam_pipelines.contracts.metadata import SCORING_REQUIRED_COLUMNS
from beam_pipelines.contracts.rejects import reject
from beam_pipelines.privacy import redact
from beam_pipelines.storage import tfrecord
from beam_pipelines.storage.files import write_json
from beam_pipelines.transforms.decode import SOURCE, DecodeForScoringFn, prediction_columns
from beam_pipelines.transforms.inference import InferenceError, KerasModelHandler
from beam_pipelines.transforms.outcomes import (
    KEPT,
    REJECTED,
    CountByReason,
    Progress,
    SplitOutcomes,
    WriteRejects,
)
from beam_pipelines.transforms.rows import ReadValidRows
from beam_pipelines.transforms.shards import WritePredictions

logger = logging.getLogger(__name__)


class ReadShardsFn(beam.DoFn):
    """A preprocessed shard -> (KEPT, (meta, image)) per record; the split is the folder name.

    A shard that cannot be read to its end (truncated, corrupt gzip, failed
    checksum, unparsable record) becomes one ``corrupt_shard`` reject that
    says how many of its records were read first (those are scored); the
    job goes on with the other shards.
    """

    def setup(self) -> None:
        self._progress = Progress("read records")

    def finish_bundle(self) -> None:
        self._progress.flush()

    def process(self, path: str) -> Iterator[tuple[str, Any]]:
        split = posixpath.basename(posixpath.dirname(path))
        read = 0
        try:
            for serialized in tfrecord.read_tfrecord_gz(path):
                self._progress.tick()
                record = records.parse_example(serialized)
                meta = prediction_columns(
                    split=split, **{k: record[k] for k in predictions.IMAGE_COLUMNS}
                )
                read += 1
                yield KEPT, (meta, record["image"])
        except MemoryError:
            raise
        except Exception as exc:  # whatever the file holds, the other shards go on
            Metrics.counter(self.__class__, "rejected_corrupt_shard").inc()
            detail = (
                f"{type(exc).__name__}: {redact(exc)}; {read} records read before it "
                "(scored); the rest of the shard is lost"
            )
            logger.warning("Shard %s is corrupt after %d records: %s", path, read, detail)
            yield REJECTED, reject(None, path, "read_shard", "corrupt_shard", detail)


def _matched_paths(pattern: str, name: str) -> Any:
    """Files a glob matches, spread over workers (a composite of its own for each input)."""
    return (
        f"Create{name}" >> beam.Create([pattern])
        | f"Match{name}" >> fileio.MatchAll()
        | f"{name}Paths" >> beam.Map(lambda m: m.path)
    )


class ReadExamples(beam.PTransform):
    """One scoring input -> (the inputs counted, (meta, image) examples, reject records).

    Exactly one of ``shard_pattern``, ``metadata`` or ``dicom_glob``. With
    ``decoding.reference_keywords`` each decoded example's meta also holds
    those header values (``source``) for the results written back as DICOM. A corrupt
    shard counts as one input (its reject balances the summary); a metadata
    row or a matched file is one input.
    """

    def __init__(
        self,
        shard_pattern: str | None,
        metadata: str | None,
        dicom_glob: str | None,
        archive_root: str,
        allowed_schemes: Collection[str],
        decoding: dicom.DecodeOptions,
        resize_policy: dicom.ResizePolicy,
    ) -> None:
        super().__init__()
        self._shard_pattern, self._metadata, self._dicom_glob = shard_pattern, metadata, dicom_glob
        self._archive_root, self._allowed_schemes = archive_root, allowed_schemes
        self._decoding, self._resize_policy = decoding, resize_policy

    def expand(
        self, pipeline: beam.pvalue.PBegin
    ) -> tuple[beam.PCollection, beam.PCollection, beam.PCollection]:
        if self._shard_pattern:
            read = (
                pipeline
                | "Shards" >> _matched_paths(self._shard_pattern, "Shard")
                | "SpreadShards" >> beam.Reshuffle()
                | "ReadShards" >> beam.ParDo(ReadShardsFn())
            )
            examples, unreadable = read | "RouteRead" >> SplitOutcomes()
            return read, examples, unreadable
        if self._metadata:
            inputs, sources, row_rejects = pipeline | "Rows" >> ReadValidRows(
                self._metadata,
                self._archive_root,
                self._allowed_schemes,
                required=SCORING_REQUIRED_COLUMNS,
                scoring=True,
            )
            examples, undecodable = self._decode(sources)
            rejects = (row_rejects, undecodable) | "InputRejects" >> beam.Flatten()
            return inputs, examples, rejects
        files = (
            pipeline
            | "Files" >> _matched_paths(str(self._dicom_glob), "File")
            | "Spread" >> beam.Reshuffle()
        )
        examples, undecodable = self._decode(files)
        return files, examples, undecodable

    def _decode(self, sources: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        return (
            sources
            | "DecodeDicom" >> beam.ParDo(DecodeForScoringFn(self._decoding, self._resize_policy))
            | "RouteDecoded" >> SplitOutcomes()
        )


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
        # The CSV row stays only beside a header reference, for the results' rejects.
        prediction = {k: v for k, v in meta.items() if k != "row" or SOURCE in meta}
        value = float(score)
        # The finding at the operating point: the same comparison the trainer makes.
        finding = None if self._threshold is None else int(value >= self._threshold)
        yield KEPT, {**prediction, "score": value, "predicted": finding, "model_id": self._model_id}


class Score(beam.PTransform):
    """(meta, image) examples -> (prediction rows, reject records of failed inference)."""

    def __init__(self, model_dir: str, batch_size: int, model_id: str, threshold: float | None):
        super().__init__()
        self._handler = KerasModelHandler(model_dir, batch_size)
        self._model_id, self._threshold = model_id, threshold

    def expand(self, examples: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        return (
            examples
            | "Score" >> ScoreImages(self._handler)
            | "ToPrediction" >> beam.ParDo(_ToPredictionFn(self._model_id, self._threshold))
            | "RouteScored" >> SplitOutcomes()
        )


class WriteScores(beam.PTransform):
    """The inputs counted -> Parquet files, the rejects file, then the summary (its path).

    Args:
        prefix: the work folder's ``<dir>/<name>`` the files are named after.
        predictions, rejects: the run's prediction rows and reject records.
        summary_fields: ``model_id``, ``point`` and ``pseudonymized`` for the summary;
            with results, ``results_target`` and ``series`` (its description and number) too.
        results: the results' outcome counts and rejects
            (:class:`~beam_pipelines.transforms.results.WriteResults`), or None.
    """

    def __init__(
        self,
        paths: dict[str, str],
        num_shards: int,
        predictions: beam.PCollection,
        rejects: beam.PCollection,
        summary_fields: dict[str, Any],
        results: tuple[beam.PCollection, beam.PCollection] | None = None,
    ) -> None:
        super().__init__()
        self._paths, self._num_shards = paths, num_shards
        self._predictions, self._rejects, self._fields = predictions, rejects, summary_fields
        self._results = results

    def expand(self, inputs: beam.PCollection) -> beam.PCollection:
        paths, fields = self._paths, self._fields
        prefix = paths["prefix"]
        files = self._predictions | "WritePredictions" >> WritePredictions(
            prefix, self._num_shards, fields["point"]
        )
        every_reject = self._rejects
        # The results' counts, side inputs when there are results (plain Nones otherwise).
        counts: Any = None
        refused: Any = None
        if self._results is not None:
            outcomes, result_rejects = self._results
            every_reject = (self._rejects, result_rejects) | "EveryReject" >> beam.Flatten()
            counts = pvalue.AsSingleton(outcomes)
            refused = pvalue.AsSingleton(result_rejects | "CountRefused" >> CountByReason())
        rejects_file = every_reject | "WriteRejects" >> WriteRejects(paths["rejects"])
        scored = self._predictions | "CountScored" >> beam.combiners.Count.Globally()
        # The balance (inputs = scored + rejected) counts the inputs' rejects only.
        by_reason = self._rejects | "CountReasons" >> CountByReason()

        def write(
            count: int,
            scored: Any,
            by_reason: Any,
            files: Any,
            rejects_file: Any,
            stored: Any,
            refused: Any,
        ) -> str:
            root = posixpath.dirname(prefix)
            written = (
                predictions.results_summary(
                    fields["results_target"],
                    fields["series"],
                    stored,
                    refused,
                )
                if stored is not None
                else None
            )
            document = predictions.summary(
                count,
                root,
                fields["model_id"],
                fields["point"],
                fields["pseudonymized"],
                scored,
                by_reason,
                files,
                rejects_file,
                results=written,
            )
            return write_json(paths["summary"], document)

        return (
            inputs
            | "CountInputs" >> beam.combiners.Count.Globally()
            | "WriteSummary"
            >> beam.Map(
                write,
                pvalue.AsSingleton(scored),
                pvalue.AsSingleton(by_reason),
                pvalue.AsList(files),
                pvalue.AsSingleton(rejects_file),
                counts,
                refused,
            )
        )
