"""Scores written back as DICOM: one Structured Report per scored image.

:class:`WriteResults` takes the scorer's prediction rows (each still holding
its source image's header reference under :data:`SOURCE`), groups them by the
series their reports go to (one new series per run and study), and for each
series stores the reports the target does not hold yet: to a PACS with
STOW-RS in batches, or as files ``DIR/<study>/<series>/<instance>.dcm``.

A report's UIDs derive from the run and its source
(:class:`beam_pipelines.contracts.structured_report.ReportRun`), so a rerun or
a retried batch stores nothing twice: what the target already holds counts as
``already_present``. An image whose report cannot be stored becomes a reject
record with stage ``results`` (the reason says why: ``refused`` by the PACS,
``store_failed`` when it could not be reached, ``no_reference`` when the
source's header lacks a UID to reference); it stays scored in the predictions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_pipelines.contracts import structured_report as sr
from beam_pipelines.contracts.rejects import INTERNAL_ERROR, internal_error_detail, reject
from beam_pipelines.privacy import Pseudonymizer, install_log_filters
from beam_pipelines.storage import dicomweb_store
from beam_pipelines.storage.dicomweb import DicomwebSettings, FetchFailed
from beam_pipelines.storage.files import atomic_create, exists, is_local, local_path
from beam_pipelines.transforms.outcomes import KEPT, REJECTED, Progress, SplitOutcomes

logger = logging.getLogger(__name__)

#: The prediction key that holds the source's header reference (dropped from the Parquet rows).
SOURCE = "source"
STAGE = "results"
#: Outcomes counted in the summary besides the rejects.
STORED, ALREADY_PRESENT = dicomweb_store.STORED, dicomweb_store.ALREADY_PRESENT
#: Reject reasons of the results stage.
REASONS: tuple[str, ...] = ("no_reference", "refused", "store_failed", INTERNAL_ERROR)


@dataclasses.dataclass(frozen=True)
class ResultsTarget:
    """Where the reports go: a DICOMweb service (``settings``) or a folder (``folder``)."""

    settings: DicomwebSettings | None = None
    folder: str | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        if (self.settings is None) == (self.folder is None):
            raise ValueError("a results target is a DICOMweb service or a folder, not both")
        if self.batch_size < 1:
            raise ValueError("the results batch size must be >= 1")

    def file_path(self, study: str, series: str, sop: str) -> str:
        """The file of one report under the folder target."""
        return f"{str(self.folder).rstrip('/')}/{study}/{series}/{sop}.dcm"


def prediction_row(prediction: dict[str, Any]) -> dict[str, Any]:
    """A prediction as the predictions contract holds it (no header reference, no CSV row)."""
    return {key: value for key, value in prediction.items() if key not in (SOURCE, "row")}


class _KeyBySeriesFn(beam.DoFn):
    """A prediction -> ((study, series of its report), item), or a ``no_reference`` reject."""

    def __init__(self, run: sr.ReportRun, pseudonymizer: Pseudonymizer | None) -> None:
        self._run, self._pseudonymizer = run, pseudonymizer

    def process(self, prediction: dict[str, Any]) -> Iterator[Any]:
        source = dict(prediction[SOURCE])
        if self._pseudonymizer is not None:
            # The report carries pseudonyms only: its UIDs derive from them too.
            source = sr.pseudonymous_source(source, self._pseudonymizer)
        row, path = prediction.get("row"), prediction["dicom_path"]
        problem = sr.source_problem(source)
        if problem:
            Metrics.counter(self.__class__, "rejected_no_reference").inc()
            yield REJECTED, reject(row, path, STAGE, "no_reference", problem)
            return
        study = source["StudyInstanceUID"]
        item = {
            "row": row,
            "dicom_path": path,
            "score": prediction["score"],
            "predicted": prediction["predicted"],
            SOURCE: source,
        }
        yield KEPT, ((study, self._run.series_uid(study)), item)


class _StoreSeriesFn(beam.DoFn):
    """(study, series), items -> one outcome per item (stored, already present) or its reject.

    The target is asked once per series what it holds; only the rest is built
    and stored, ``batch_size`` reports per request.
    """

    def __init__(self, target: ResultsTarget, run: sr.ReportRun) -> None:
        self._target, self._run = target, run

    def setup(self) -> None:
        install_log_filters()  # workers never run the CLI
        self._progress = Progress("results stored or accounted for", bar=False)
        self._builder = sr.ReportBuilder(self._run)

    def finish_bundle(self) -> None:
        self._progress.flush()

    def process(self, element: tuple[tuple[str, str], Iterable[dict[str, Any]]]) -> Iterator[Any]:
        (study, series), grouped = element
        items: dict[str, dict[str, Any]] = {}
        for item in sorted(
            grouped, key=lambda i: (i["row"] is None, i["row"] or 0, i["dicom_path"])
        ):
            sop = self._run.sop_uid(item[SOURCE]["SOPInstanceUID"])
            if sop in items:  # the same image twice in the input: one report
                yield from self._outcome(item, ALREADY_PRESENT)
            else:
                items[sop] = item
        try:
            present = self._present(study, series, list(items))
        except FetchFailed as exc:
            for item in items.values():
                yield from self._reject(item, "store_failed", f"listing the series: {exc}")
            return
        missing = [(sop, item) for sop, item in items.items() if sop not in present]
        for sop, item in items.items():
            if sop in present:
                yield from self._outcome(item, ALREADY_PRESENT)
        size = self._target.batch_size
        for start in range(0, len(missing), size):
            yield from self._store(study, series, missing[start : start + size])

    def _present(self, study: str, series: str, sops: list[str]) -> set[str]:
        if self._target.settings is not None:
            return dicomweb_store.stored_instances(self._target.settings, study, series)
        return {sop for sop in sops if exists(self._target.file_path(study, series, sop))}

    def _store(
        self, study: str, series: str, batch: list[tuple[str, dict[str, Any]]]
    ) -> Iterator[Any]:
        encoded: list[tuple[str, bytes]] = []
        by_sop: dict[str, dict[str, Any]] = {}
        for sop, item in batch:
            try:
                data = self._builder.encoded(item[SOURCE], item["score"], item["predicted"])
                encoded.append((sop, data))
                by_sop[sop] = item
            except MemoryError:
                raise
            except Exception as exc:  # a bug on one report: that image is rejected, the job goes on
                detail = internal_error_detail(exc, STAGE, item["row"])
                yield from self._reject(item, INTERNAL_ERROR, detail)
        if not encoded:
            return
        if self._target.settings is None:
            for sop, data in encoded:
                yield from self._write_file(study, series, sop, data, by_sop[sop])
            return
        try:
            answers = dicomweb_store.store_instances(self._target.settings, study, encoded)
        except FetchFailed as exc:
            for sop, _ in encoded:
                yield from self._reject(by_sop[sop], "store_failed", str(exc))
            return
        for sop, _ in encoded:
            answer, why = answers[sop]
            if answer == dicomweb_store.REFUSED:
                yield from self._reject(by_sop[sop], "refused", why or "refused")
            else:
                yield from self._outcome(by_sop[sop], answer)

    def _write_file(
        self, study: str, series: str, sop: str, data: bytes, item: dict[str, Any]
    ) -> Iterator[Any]:
        path = self._target.file_path(study, series, sop)
        try:
            if is_local(path):
                os.makedirs(os.path.dirname(local_path(path)), exist_ok=True)
            with atomic_create(path) as handle:
                handle.write(data)
        except OSError as exc:
            yield from self._reject(item, "store_failed", f"writing the file: {exc.strerror}")
            return
        yield from self._outcome(item, STORED)

    def _outcome(self, item: dict[str, Any], outcome: str) -> Iterator[Any]:
        self._progress.tick()
        Metrics.counter(self.__class__, outcome).inc()
        yield KEPT, outcome

    def _reject(self, item: dict[str, Any], reason: str, detail: str) -> Iterator[Any]:
        self._progress.tick()
        Metrics.counter(self.__class__, f"rejected_{reason}").inc()
        yield REJECTED, reject(item["row"], item["dicom_path"], STAGE, reason, detail)


class WriteResults(beam.PTransform):
    """Prediction rows with their :data:`SOURCE` -> ({outcome: count}, reject records).

    The first output is a single dict (``stored``, ``already_present``, each
    present even at zero); the rejects have stage ``results``.
    """

    def __init__(
        self, target: ResultsTarget, run: sr.ReportRun, pseudonymizer: Pseudonymizer | None
    ) -> None:
        super().__init__()
        self._target, self._run, self._pseudonymizer = target, run, pseudonymizer

    def expand(self, scored: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        keyed, unreferenced = (
            scored
            | "KeyBySeries" >> beam.ParDo(_KeyBySeriesFn(self._run, self._pseudonymizer))
            | "RouteKeyed" >> SplitOutcomes()
        )
        outcomes, refused = (
            keyed
            | "GroupBySeries" >> beam.GroupByKey()
            | "StoreSeries" >> beam.ParDo(_StoreSeriesFn(self._target, self._run))
            | "RouteStored" >> SplitOutcomes()
        )
        counts = (
            outcomes
            | "CountOutcomes" >> beam.combiners.Count.PerElement()
            | "OutcomeCounts" >> beam.combiners.ToDict()
            | "EveryOutcome" >> beam.Map(lambda found: {STORED: 0, ALREADY_PRESENT: 0, **found})
        )
        rejects = (unreferenced, refused) | "ResultRejects" >> beam.Flatten()
        return counts, rejects
