"""Scores written back as DICOM: one Structured Report per scored image.

:class:`WriteResults` takes the scorer's prediction rows (each still holding
its source image's header reference under :data:`SOURCE`), keys them by the
report they make (one per image, in a new series per run and study), and
stores, in batches of reports of any studies, those the target does not
hold yet: to a PACS with STOW-RS, or as files
``DIR/<study>/<series>/<instance>.dcm``.

A report's UIDs derive from the run and its source
(:class:`beam_pipelines.contracts.structured_report.ReportRun`), so a rerun or
a retried batch stores nothing twice: what the target already holds counts as
``already_present``. An image whose report cannot be stored becomes a reject
record with stage ``results`` (the reason says why: ``refused`` by the PACS,
``store_failed`` when it could not be reached, ``no_reference`` when the
source's header lacks a UID to reference); it stays scored in the predictions.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_pipelines.contracts import structured_report as sr
from beam_pipelines.contracts.rejects import INTERNAL_ERROR, internal_error_detail, order, reject
from beam_pipelines.privacy import Pseudonymizer, install_log_filters
from beam_pipelines.storage import dicomweb_store
from beam_pipelines.storage.dicomweb import DicomwebSettings, FetchFailed
from beam_pipelines.storage.files import atomic_create, exists
from beam_pipelines.transforms.decode import SOURCE
from beam_pipelines.transforms.outcomes import KEPT, REJECTED, Progress, SplitOutcomes

STAGE = "results"
#: Outcomes counted in the summary besides the rejects.
STORED, ALREADY_PRESENT = dicomweb_store.STORED, dicomweb_store.ALREADY_PRESENT
REFUSED = dicomweb_store.REFUSED
_NOT_IN_ANSWER = dicomweb_store.NOT_IN_ANSWER


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


class _KeyByReportFn(beam.DoFn):
    """A prediction -> (its report's SOP Instance UID, item), or a ``no_reference`` reject."""

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
        study, series, sop = (source[k] for k in sr.SOURCE_UIDS)
        item = {
            "row": row,
            "dicom_path": path,
            "score": prediction["score"],
            "predicted": prediction["predicted"],
            "study": study,
            "series": self._run.series_uid(study),
            SOURCE: source,
        }
        yield KEPT, (self._run.sop_uid(study, series, sop), item)


def _one_report(element: tuple[str, Iterable[dict[str, Any]]]) -> tuple[str, dict, list[dict]]:
    """(report UID, items) -> (UID, the item it is built from, its twins).

    Twins are the same image listed again (another path to the same file):
    one report serves them all. The first in the rejects' order (row, then
    path) is built, the same on every run.
    """
    sop, items = element
    first, *twins = sorted(items, key=order)
    return sop, first, twins


#: One report's outcome: STORED or ALREADY_PRESENT, else (reject reason, detail).
Outcome = str | tuple[str, str]


class _StoreBatchFn(beam.DoFn):
    """A batch of reports -> one outcome (stored, already present) or reject per image.

    The target is asked once per batch which reports it holds; only the rest
    are built and stored, in one request. A request the server refuses as a
    whole is sent again one report at a time, so one bad report never costs
    its batch; reports a 2xx answer does not account for are looked up again.
    """

    def __init__(self, target: ResultsTarget, run: sr.ReportRun) -> None:
        self._target, self._run = target, run

    def setup(self) -> None:
        install_log_filters()  # workers never run the CLI
        self._progress = Progress("results stored or accounted for", bar=False)
        # One builder per DoFn instance: it reuses a template, not thread-safe.
        self._builder = sr.ReportBuilder(self._run)

    def finish_bundle(self) -> None:
        self._progress.flush()

    def process(self, batch: list[tuple[str, dict, list[dict]]]) -> Iterator[Any]:
        reports = {sop: (item, twins) for sop, item, twins in batch}
        try:
            present = self._present(reports)
        except Exception as exc:  # a failed search (or folder) costs this batch only
            failed = ("store_failed", _failure("asking what the target holds", exc))
            for item, twins in reports.values():
                yield from self._settle(item, twins, failed)
            return
        encoded: list[tuple[str, bytes]] = []
        for sop, (item, twins) in reports.items():
            if sop in present:
                yield from self._settle(item, twins, ALREADY_PRESENT)
                continue
            try:
                data = self._builder.encoded(item[SOURCE], item["score"], item["predicted"])
            except MemoryError:
                raise
            except Exception as exc:  # a bug on one report: that image is rejected, the job goes on
                detail = internal_error_detail(exc, STAGE, item["row"])
                yield from self._settle(item, twins, (INTERNAL_ERROR, detail))
                continue
            encoded.append((sop, data))
        if self._target.settings is None:
            outcomes = {sop: self._write_file(reports[sop][0], sop, data) for sop, data in encoded}
        else:
            outcomes = self._store(encoded)
        for sop, outcome in outcomes.items():
            item, twins = reports[sop]
            yield from self._settle(item, twins, outcome)

    def _present(self, reports: dict[str, tuple[dict, list[dict]]]) -> set[str]:
        if self._target.settings is not None:
            return dicomweb_store.present_instances(self._target.settings, list(reports))
        return {sop for sop, (item, _) in reports.items() if exists(self._path(item, sop))}

    def _path(self, item: dict[str, Any], sop: str) -> str:
        return self._target.file_path(item["study"], item["series"], sop)

    def _store(self, encoded: list[tuple[str, bytes]]) -> dict[str, Outcome]:
        """STOW-RS: every report's outcome."""
        if not encoded:
            return {}
        outcomes = self._send(encoded)
        details = set(outcomes.values())
        if len(encoded) > 1 and len(details) == 1:
            [only] = details
            if isinstance(only, tuple) and only[0] == "refused" and only[1].startswith("HTTP "):
                # Refused as a whole (413, 400, a 401 after a token change): one at a time.
                outcomes = {}
                for one in encoded:
                    outcomes |= self._send([one])
        unclear = [sop for sop, o in outcomes.items() if o == ("refused", _NOT_IN_ANSWER)]
        if unclear:
            # A 2xx without a usable answer: what the server holds now says what happened.
            settings = self._target.settings
            assert settings is not None
            # Still unknown, they stay refused: the next run finds them if they were stored.
            with contextlib.suppress(FetchFailed):
                held = dicomweb_store.present_instances(settings, unclear)
                outcomes |= dict.fromkeys(held, STORED)
        return outcomes

    def _send(self, encoded: list[tuple[str, bytes]]) -> dict[str, Outcome]:
        settings = self._target.settings
        assert settings is not None
        try:
            answers = dicomweb_store.store_instances(settings, None, encoded)
        except FetchFailed as exc:
            return {sop: ("store_failed", str(exc)) for sop, _ in encoded}
        return {
            sop: ("refused", detail or "refused") if outcome == REFUSED else outcome
            for sop, (outcome, detail) in answers.items()
        }

    def _write_file(self, item: dict[str, Any], sop: str, data: bytes) -> Outcome:
        try:
            # atomic_create makes the study and series folders (locally too).
            with atomic_create(self._path(item, sop)) as handle:
                handle.write(data)
        except Exception as exc:  # a folder that cannot be written: this report only
            return "store_failed", _failure("writing the file", exc)
        return STORED

    def _settle(
        self, item: dict[str, Any], twins: list[dict[str, Any]], outcome: Outcome
    ) -> Iterator[Any]:
        """The outcome of one report, for its image and each of its twins."""
        for n, image in enumerate([item, *twins]):
            self._progress.tick()
            if isinstance(outcome, str):
                # For a twin, the report just stored (or found) is already there.
                settled = outcome if n == 0 else ALREADY_PRESENT
                Metrics.counter(self.__class__, settled).inc()
                yield KEPT, settled
            else:
                reason, detail = outcome
                Metrics.counter(self.__class__, f"rejected_{reason}").inc()
                yield REJECTED, reject(image["row"], image["dicom_path"], STAGE, reason, detail)


def _failure(doing: str, exc: BaseException) -> str:
    """A reject detail for a failure: what was being done and the error's kind, no path or UID."""
    if isinstance(exc, FetchFailed):
        return f"{doing}: {exc}"
    reason = getattr(exc, "strerror", None)
    return f"{doing}: {type(exc).__name__}" + (f" ({reason})" if reason else "")


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
        size = self._target.batch_size
        keyed, unreferenced = (
            scored
            | "KeyByReport" >> beam.ParDo(_KeyByReportFn(self._run, self._pseudonymizer))
            | "RouteKeyed" >> SplitOutcomes()
        )
        outcomes, refused = (
            keyed
            | "GroupByReport" >> beam.GroupByKey()
            | "OneReport" >> beam.Map(_one_report)
            | "Batch" >> beam.BatchElements(min_batch_size=size, max_batch_size=size)
            | "StoreBatch" >> beam.ParDo(_StoreBatchFn(self._target, self._run))
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
