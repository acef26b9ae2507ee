"""beam_pipelines.transforms.results: every scored image ends stored, already present or rejected.

The DoFns are driven directly with the PACS answers scripted (the end-to-end
tests in test_results_jobs.py use a real Orthanc): a refusal keeps its
reason, an unreachable PACS rejects its batch and nothing else, the same
image twice is one report, a report the target holds is never stored again.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import apache_beam as beam
import pydicom
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines.contracts import structured_report as sr
from beam_pipelines.privacy import Pseudonymizer
from beam_pipelines.storage import dicomweb_store
from beam_pipelines.storage.dicomweb import DicomwebSettings, FetchFailed
from beam_pipelines.transforms import results
from beam_pipelines.transforms.outcomes import KEPT, REJECTED

RUN = sr.ReportRun(model_id="cnn-1", model_digest="ab" * 32, threshold=0.5, options={})
PACS = results.ResultsTarget(settings=DicomwebSettings(url="http://pacs.invalid/dw"), batch_size=2)
STUDY = "1.2.826.0.1.3680043.8.498.1"


def _prediction(n: int, study: str = STUDY, score: float = 0.75) -> dict[str, Any]:
    source = {keyword: "" for keyword in sr.SOURCE_KEYWORDS}
    source |= {
        "PatientID": "PAT-7",
        "PatientName": "Doe^Jane",
        "StudyInstanceUID": study,
        "SeriesInstanceUID": f"{study}.2",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1",
        "SOPInstanceUID": f"{study}.2.{n}",
    }
    return {
        "row": n,
        "dicom_path": f"images/{n}.dcm",
        "score": score,
        "predicted": int(score >= 0.5),
        "model_id": "cnn-1",
        results.SOURCE: source,
    }


def _keyed(predictions: list[dict[str, Any]], pseudonymizer: Any = None) -> list[Any]:
    fn = results._KeyBySeriesFn(RUN, pseudonymizer)
    return [out for p in predictions for out in fn.process(p)]


def _store(target: results.ResultsTarget, predictions: list[dict[str, Any]]) -> list[Any]:
    keyed = _keyed(predictions)
    fn = results._StoreSeriesFn(target, RUN)
    fn.setup()
    groups: dict[Any, list[Any]] = {}
    for tag, (key, item) in keyed:
        assert tag == KEPT
        groups.setdefault(key, []).append(item)
    return [out for key, items in groups.items() for out in fn.process((key, items))]


def test_predictions_are_keyed_by_the_run_series_of_their_study() -> None:
    keyed = _keyed([_prediction(1), _prediction(2), _prediction(3, study=f"{STUDY}9")])
    keys = [key for _, (key, _) in keyed]
    assert keys[0] == keys[1] == (STUDY, RUN.series_uid(STUDY))
    assert keys[2] == (f"{STUDY}9", RUN.series_uid(f"{STUDY}9")) != keys[0]


def test_a_source_without_a_uid_is_a_no_reference_reject() -> None:
    broken = _prediction(1)
    broken[results.SOURCE]["SOPInstanceUID"] = ""
    [(tag, record)] = _keyed([broken])
    assert tag == REJECTED
    assert (record["row"], record["stage"], record["reason"]) == (1, "results", "no_reference")
    assert "SOPInstanceUID" in record["detail"]


def test_pseudonymized_sources_are_keyed_by_pseudonymous_uids() -> None:
    [(_, ((study, _), item))] = _keyed([_prediction(1)], Pseudonymizer(b"k" * 16))
    assert study != STUDY and study.startswith("2.25.")
    assert item[results.SOURCE]["PatientID"] != "PAT-7"


def test_stored_in_batches_and_what_the_pacs_holds_is_not_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = {RUN.sop_uid(f"{STUDY}.2.1")}
    batches: list[list[str]] = []

    def store(settings: Any, study: str, instances: Any) -> dict[str, Any]:
        assert study == STUDY
        batches.append([sop for sop, _ in instances])
        for _, data in instances:  # real Part 10 SRs
            assert pydicom.dcmread(io.BytesIO(data)).Modality == "SR"
        return {sop: (dicomweb_store.STORED, None) for sop, _ in instances}

    monkeypatch.setattr(dicomweb_store, "stored_instances", lambda *args: held)
    monkeypatch.setattr(dicomweb_store, "store_instances", store)
    outcomes = _store(PACS, [_prediction(n) for n in range(1, 6)] + [_prediction(2)])
    assert sorted(outcomes) == sorted(
        [(KEPT, results.ALREADY_PRESENT)] * 2 + [(KEPT, results.STORED)] * 4
    )
    assert [len(batch) for batch in batches] == [2, 2]  # --results_batch_size 2
    assert not held & {sop for batch in batches for sop in batch}


def test_a_refusal_keeps_its_reason_and_an_unreachable_pacs_rejects_its_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused_sop = RUN.sop_uid(f"{STUDY}.2.1")
    calls = []

    def store(settings: Any, study: str, instances: Any) -> dict[str, Any]:
        calls.append(len(calls))
        if len(calls) == 2:
            raise FetchFailed("connection refused after 2 attempts")
        return {
            sop: (
                (dicomweb_store.REFUSED, "FailureReason 0xA900 (data set does not match SOP class)")
                if sop == refused_sop
                else (dicomweb_store.STORED, None)
            )
            for sop, _ in instances
        }

    monkeypatch.setattr(dicomweb_store, "stored_instances", lambda *args: set())
    monkeypatch.setattr(dicomweb_store, "store_instances", store)
    outcomes = _store(PACS, [_prediction(n) for n in range(1, 5)])
    rejects = sorted((r["row"], r["reason"], r["detail"]) for tag, r in outcomes if tag == REJECTED)
    stored = [o for tag, o in outcomes if tag == KEPT]
    assert len(outcomes) == 4  # every image accounted for once
    assert stored == [results.STORED]
    assert rejects[0][:2] == (1, "refused") and "0xA900" in rejects[0][2]
    assert [(row, reason) for row, reason, _ in rejects[1:]] == [
        (3, "store_failed"),
        (4, "store_failed"),
    ]


def test_a_series_that_cannot_be_listed_rejects_its_images(monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*args: Any) -> set[str]:
        raise FetchFailed("timed out after 5 attempts")

    monkeypatch.setattr(dicomweb_store, "stored_instances", down)
    outcomes = _store(PACS, [_prediction(1), _prediction(2)])
    assert [(tag, r["reason"]) for tag, r in outcomes] == [(REJECTED, "store_failed")] * 2
    assert all("timed out" in r["detail"] for _, r in outcomes)


def test_a_report_that_cannot_be_built_is_an_internal_error_reject(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(sr.ReportBuilder, "encoded", broken)
    target = results.ResultsTarget(folder=str(tmp_path))
    [(tag, record)] = _store(target, [_prediction(1)])
    assert (tag, record["reason"], record["stage"]) == (REJECTED, "internal_error", "results")
    assert not list(tmp_path.rglob("*.dcm"))


def test_files_are_written_once_per_report(tmp_path: Path) -> None:
    target = results.ResultsTarget(folder=str(tmp_path / "reports"))
    first = _store(target, [_prediction(1), _prediction(2)])
    assert first == [(KEPT, results.STORED)] * 2
    files = sorted((tmp_path / "reports").rglob("*.dcm"))
    assert [f.relative_to(tmp_path / "reports").parts[:2] for f in files] == [
        (STUDY, RUN.series_uid(STUDY))
    ] * 2
    stamps = [f.stat().st_mtime_ns for f in files]
    again = _store(target, [_prediction(1), _prediction(2), _prediction(3)])
    assert sorted(again) == sorted([(KEPT, results.ALREADY_PRESENT)] * 2 + [(KEPT, results.STORED)])
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert not list((tmp_path / "reports").rglob("*.tmp-*"))


def test_write_results_counts_every_outcome(tmp_path: Path) -> None:
    target = results.ResultsTarget(folder=str(tmp_path))
    broken = _prediction(3)
    broken[results.SOURCE]["StudyInstanceUID"] = ""
    with TestPipeline() as pipeline:
        counts, rejects = (
            pipeline
            | beam.Create([_prediction(1), _prediction(2), broken])
            | results.WriteResults(target, RUN, None)
        )
        assert_that(counts, equal_to([{"stored": 2, "already_present": 0}]), label="Counts")
        reasons = rejects | beam.Map(lambda r: (r["row"], r["reason"]))
        assert_that(reasons, equal_to([(3, "no_reference")]), label="Rejects")


def test_a_target_is_a_pacs_or_a_folder() -> None:
    with pytest.raises(ValueError):
        results.ResultsTarget()
    with pytest.raises(ValueError):
        results.ResultsTarget(settings=PACS.settings, folder="x")
    assert results.prediction_row(_prediction(1)).keys() == {
        "dicom_path",
        "score",
        "predicted",
        "model_id",
    }
