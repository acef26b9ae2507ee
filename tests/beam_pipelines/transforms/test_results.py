"""beam_pipelines.transforms.results: every scored image ends stored, already present or rejected.

The DoFns are driven directly with the PACS answers scripted (the end-to-end
tests in test_results_jobs.py use a real Orthanc): a refusal keeps its
reason, an unreachable PACS rejects its batch and nothing else, a request
refused as a whole is retried one report at a time, the same image twice is
one report with one fate, a report the target holds is never stored again,
and nothing of the source reaches a log line.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import apache_beam as beam
import pydicom
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines.contracts import structured_report as sr
from beam_pipelines.privacy import Pseudonymizer, install_log_filters
from beam_pipelines.storage import dicomweb_store
from beam_pipelines.storage.dicomweb import DicomwebSettings, FetchFailed
from beam_pipelines.transforms import results
from beam_pipelines.transforms.outcomes import KEPT, REJECTED

RUN = sr.ReportRun(model_id="cnn-1", model_digest="ab" * 32, threshold=0.5, options={})
PACS = results.ResultsTarget(settings=DicomwebSettings(url="http://pacs.invalid/dw"), batch_size=2)
STUDY = "1.2.826.0.1.3680043.8.498.1"
STORED, PRESENT = (KEPT, results.STORED), (KEPT, results.ALREADY_PRESENT)


def _prediction(n: int, study: str = STUDY, score: float = 0.75, path: str = "") -> dict[str, Any]:
    source = {keyword: "" for keyword in sr.SOURCE_KEYWORDS}
    source |= {
        "PatientID": "PAT-77123",
        "PatientName": "Quaresma^Ottilie",
        "StudyInstanceUID": study,
        "SeriesInstanceUID": f"{STUDY}.2",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1",
        "SOPInstanceUID": f"{STUDY}.2.{n}",
    }
    return {
        "row": n,
        "dicom_path": path or f"images/{n}.dcm",
        "score": score,
        "predicted": int(score >= 0.5),
        "model_id": "cnn-1",
        results.SOURCE: source,
    }


def _report_uid(prediction: dict[str, Any]) -> str:
    return RUN.sop_uid(*(prediction[results.SOURCE][k] for k in sr.SOURCE_UIDS))


def _keyed(predictions: list[dict[str, Any]], pseudonymizer: Any = None) -> list[Any]:
    fn = results._KeyByReportFn(RUN, pseudonymizer)
    return [out for p in predictions for out in fn.process(p)]


def _store(target: results.ResultsTarget, predictions: list[dict[str, Any]]) -> list[Any]:
    """What the results stage makes of these predictions: keyed, grouped, batched, stored."""
    groups: dict[str, list[Any]] = {}
    for tag, (sop, item) in _keyed(predictions):
        assert tag == KEPT
        groups.setdefault(sop, []).append(item)
    reports = [results._one_report(group) for group in groups.items()]
    fn = results._StoreBatchFn(target, RUN)
    fn.setup()
    size = target.batch_size
    return [
        out for at in range(0, len(reports), size) for out in fn.process(reports[at : at + size])
    ]


def _reasons(outcomes: list[Any]) -> list[tuple[int, str]]:
    return sorted((r["row"], r["reason"]) for tag, r in outcomes if tag == REJECTED)


def _pacs(monkeypatch: pytest.MonkeyPatch, held: set[str], store: Any) -> list[list[str]]:
    """Scripts the PACS: what it holds, and its answer to each STOW request (recorded)."""
    requests: list[list[str]] = []

    def stow(settings: Any, study: Any, instances: Any) -> dict[str, Any]:
        assert study is None  # one request may hold reports of many studies
        requests.append([sop for sop, _ in instances])
        for _, data in instances:  # real Part 10 SRs
            assert pydicom.dcmread(io.BytesIO(data)).Modality == "SR"
        return store(requests, [sop for sop, _ in instances])

    monkeypatch.setattr(dicomweb_store, "present_instances", lambda s, uids: held & set(uids))
    monkeypatch.setattr(dicomweb_store, "store_instances", stow)
    return requests


def _all_stored(requests: Any, sops: list[str]) -> dict[str, Any]:
    return {sop: (dicomweb_store.STORED, None) for sop in sops}


def test_predictions_are_keyed_by_their_report_and_its_run_series() -> None:
    keyed = _keyed([_prediction(1), _prediction(2), _prediction(3, study=f"{STUDY}9")])
    items = [item for _, (_, item) in keyed]
    assert [sop for _, (sop, _) in keyed] == [_report_uid(_prediction(n)) for n in (1, 2)] + [
        _report_uid(_prediction(3, study=f"{STUDY}9"))
    ]
    assert items[0]["series"] == items[1]["series"] == RUN.series_uid(STUDY)
    assert items[2]["series"] == RUN.series_uid(f"{STUDY}9") != items[0]["series"]


def test_the_same_instance_uid_in_two_studies_makes_two_reports() -> None:
    [(_, (one, _)), (_, (other, _))] = _keyed([_prediction(1), _prediction(1, study=f"{STUDY}9")])
    assert one != other


def test_a_source_without_a_uid_is_a_no_reference_reject() -> None:
    broken = _prediction(1)
    broken[results.SOURCE]["SOPInstanceUID"] = ""
    [(tag, record)] = _keyed([broken])
    assert tag == REJECTED
    assert (record["row"], record["stage"], record["reason"]) == (1, "results", "no_reference")
    assert "SOPInstanceUID" in record["detail"]


def test_pseudonymized_sources_are_keyed_by_pseudonymous_uids() -> None:
    [(_, (_, item))] = _keyed([_prediction(1)], Pseudonymizer(b"k" * 16))
    assert item["study"] != STUDY and item["study"].startswith("2.25.")
    assert item[results.SOURCE]["PatientID"] != "PAT-77123"


def test_batches_go_in_one_request_and_what_the_pacs_holds_is_not_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    predictions = [_prediction(n, study=f"{STUDY}{n}") for n in range(1, 6)]
    held = {_report_uid(predictions[0])}
    requests = _pacs(monkeypatch, held, _all_stored)
    outcomes = _store(PACS, predictions)
    assert sorted(outcomes) == sorted([PRESENT] + [STORED] * 4)
    assert [len(r) for r in requests] == [1, 2, 1]  # batches of 2; the held one never sent
    assert not held & {sop for r in requests for sop in r}


def test_a_refusal_keeps_its_reason_and_an_unreachable_pacs_rejects_its_batch_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused = _report_uid(_prediction(1))

    def store(requests: Any, sops: list[str]) -> dict[str, Any]:
        if len(requests) == 2:
            raise FetchFailed("connection refused after 2 attempts")
        detail = "FailureReason 0xA900 (data set does not match SOP class)"
        return {
            sop: (dicomweb_store.REFUSED, detail)
            if sop == refused
            else (dicomweb_store.STORED, None)
            for sop in sops
        }

    _pacs(monkeypatch, set(), store)
    outcomes = _store(PACS, [_prediction(n) for n in range(1, 5)])
    assert len(outcomes) == 4  # every image accounted for once
    assert [o for o in outcomes if o[0] == KEPT] == [STORED]
    assert _reasons(outcomes) == [(1, "refused"), (3, "store_failed"), (4, "store_failed")]
    details = {r["row"]: r["detail"] for tag, r in outcomes if tag == REJECTED}
    assert "0xA900" in details[1] and "connection refused" in details[3]


def test_a_request_refused_as_a_whole_is_sent_again_one_report_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = _report_uid(_prediction(2))

    def store(requests: Any, sops: list[str]) -> dict[str, Any]:
        if len(sops) > 1 or bad in sops:  # e.g. 413 for the batch, 400 for the bad one
            return {sop: (dicomweb_store.REFUSED, "HTTP 400: bad request") for sop in sops}
        return _all_stored(requests, sops)

    requests = _pacs(monkeypatch, set(), store)
    outcomes = _store(PACS, [_prediction(1), _prediction(2)])
    assert [len(r) for r in requests] == [2, 1, 1]
    assert sorted(o for o in outcomes if o[0] == KEPT) == [STORED]
    assert _reasons(outcomes) == [(2, "refused")]


def test_reports_a_2xx_answer_leaves_out_are_looked_up_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held: set[str] = set()

    def store(requests: Any, sops: list[str]) -> dict[str, Any]:
        held.update(sops[:1])  # the server kept the first, and answered with no usable body
        return {sop: (dicomweb_store.REFUSED, dicomweb_store.NOT_IN_ANSWER) for sop in sops}

    _pacs(monkeypatch, held, store)
    outcomes = _store(PACS, [_prediction(1), _prediction(2)])
    assert [o for o in outcomes if o[0] == KEPT] == [STORED]
    assert _reasons(outcomes) == [(2, "refused")]


@pytest.mark.parametrize("fate", ["stored", "refused", "unreachable"])
def test_the_same_image_twice_is_one_report_with_one_fate(
    monkeypatch: pytest.MonkeyPatch, fate: str
) -> None:
    def store(requests: Any, sops: list[str]) -> dict[str, Any]:
        if fate == "unreachable":
            raise FetchFailed("timed out after 5 attempts")
        if fate == "refused":
            return {sop: (dicomweb_store.REFUSED, "FailureReason 0xA700") for sop in sops}
        return _all_stored(requests, sops)

    requests = _pacs(monkeypatch, set(), store)
    twin = _prediction(1, path="copies/1.dcm")
    twin["row"] = 9
    outcomes = _store(PACS, [twin, _prediction(1)])
    assert [len(r) for r in requests] == [1]
    if fate == "stored":  # stored once: for the later row it is already there
        assert outcomes == [STORED, PRESENT]
    else:
        reason = "refused" if fate == "refused" else "store_failed"
        assert _reasons(outcomes) == [(1, reason), (9, reason)]


def test_a_pacs_that_cannot_be_asked_rejects_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*args: Any) -> set[str]:
        raise FetchFailed("timed out after 5 attempts")

    monkeypatch.setattr(dicomweb_store, "present_instances", down)
    outcomes = _store(PACS, [_prediction(1), _prediction(2)])
    assert _reasons(outcomes) == [(1, "store_failed"), (2, "store_failed")]
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
    assert first == [STORED] * 2
    files = sorted((tmp_path / "reports").rglob("*.dcm"))
    assert [f.relative_to(tmp_path / "reports").parts[:2] for f in files] == [
        (STUDY, RUN.series_uid(STUDY))
    ] * 2
    stamps = [f.stat().st_mtime_ns for f in files]
    again = _store(target, [_prediction(1), _prediction(2), _prediction(3)])
    assert sorted(again) == sorted([PRESENT] * 2 + [STORED])
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert not list((tmp_path / "reports").rglob("*.tmp-*"))


def test_a_folder_that_cannot_be_written_rejects_without_naming_a_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")  # a file where the folder should be
    outcomes = _store(results.ResultsTarget(folder=str(tmp_path / "file")), [_prediction(1)])
    [(tag, record)] = outcomes
    assert (tag, record["reason"]) == (REJECTED, "store_failed")
    assert STUDY not in record["detail"] and str(tmp_path) not in record["detail"]


def test_no_source_value_reaches_a_log_line(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    install_log_filters()  # as every job's entry point and the stage's setup() do
    with caplog.at_level(logging.DEBUG):
        _store(results.ResultsTarget(folder=str(tmp_path)), [_prediction(1), _prediction(2)])
    logged = caplog.text
    for value in (STUDY, "PAT-77123", "Quaresma", f"{STUDY}.2.1"):
        assert value not in logged


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
