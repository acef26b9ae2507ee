"""beam_pipelines.contracts.structured_report: the SR xray-score writes per scored image.

What would break an archive or a rerun: UIDs that are not deterministic (a rerun
would store every report twice) or that collide across models, options or sources;
an SR outside the source's study; a score that does not read back exactly; an
invalid SR (dciodvfy, when installed); an original identifier in a pseudonymized SR.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from beam_pipelines.contracts import structured_report as sr
from beam_pipelines.privacy import Pseudonymizer

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy (Debian dicom3tools) is not installed"
)

SOURCE = {
    "PatientName": "Quaresma^Ottilie^Maud",
    "PatientID": "MRN-88231-QX",
    "IssuerOfPatientID": "ST-ELSEWHERE-HOSP",
    "PatientBirthDate": "19510923",
    "PatientSex": "F",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.771001",
    "StudyDate": "20240102",
    "StudyTime": "101500",
    "StudyID": "STUDY-7719",
    "AccessionNumber": "ACC-55013-ZZ",
    "ReferringPhysicianName": "Vandermeer^Corwin",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.771002",
    "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image, for presentation
    "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.771003",
}
RUN = sr.ReportRun("densenet121-chexpert", "ab" * 32, 0.5, {"resize_policy": "pad"})


def _image(**changes: str) -> dict[str, str]:
    return {**SOURCE, **changes}


def _dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    path = tmp_path / "report.dcm"
    path.write_bytes(data)
    assert DCIODVFY is not None
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    lines = (done.stdout + done.stderr).splitlines()
    assert any("EnhancedSR" in line for line in lines), lines  # it recognised the IOD
    return [line for line in lines if line.startswith("Error")]


def _round_trip(source: dict[str, str], score: float, finding: int | None) -> dict[str, Any]:
    return sr.read_report(sr.encode(sr.build_report(source, score, finding, RUN)))


# --- identity: deterministic UIDs --------------------------------------------------------


def test_uids_are_deterministic_valid_and_distinct_across_runs_and_sources() -> None:
    sop = SOURCE["SOPInstanceUID"]
    runs = [
        RUN,
        dataclasses.replace(RUN, model_id="efficientnet"),
        dataclasses.replace(RUN, model_digest="cd" * 32),
        dataclasses.replace(RUN, threshold=0.4),
        dataclasses.replace(RUN, threshold=None),
        dataclasses.replace(RUN, options={"resize_policy": "crop"}),
        dataclasses.replace(RUN, options={}),
        dataclasses.replace(RUN, pseudonymized="0123456789abcdef"),
    ]
    study, series = SOURCE["StudyInstanceUID"], SOURCE["SeriesInstanceUID"]
    uids = [run.sop_uid(study, series, sop) for run in runs]
    # Another image, and the same SOP Instance UID in another study or series.
    uids += [RUN.sop_uid(study, series, sop + ".1"), RUN.sop_uid(study + ".9", series, sop)]
    uids += [RUN.sop_uid(study, series + ".9", sop)]
    uids += [run.series_uid(SOURCE["StudyInstanceUID"]) for run in runs]
    assert len(set(uids)) == len(uids)
    assert all(UID(uid).is_valid and len(uid) <= 64 for uid in uids)
    rebuilt = sr.ReportRun("densenet121-chexpert", "ab" * 32, 0.5, {"resize_policy": "pad"})
    assert rebuilt.sop_uid(study, series, sop) == RUN.sop_uid(study, series, sop)
    assert rebuilt.series_uid("1.2.3") == RUN.series_uid("1.2.3")
    assert rebuilt.digest == RUN.digest and len(RUN.digest) == 64


def test_digest_ignores_option_order_and_refuses_nan() -> None:
    a = dataclasses.replace(RUN, options={"a": 1, "b": [1, 2]})
    b = dataclasses.replace(RUN, options={"b": [1, 2], "a": 1})
    assert a.digest == b.digest
    with pytest.raises(ValueError):
        _ = dataclasses.replace(RUN, threshold=float("nan")).digest


def test_two_images_of_a_study_share_the_run_series_other_studies_do_not() -> None:
    first = sr.build_report(SOURCE, 0.2, 0, RUN)
    second = sr.build_report(_image(SOPInstanceUID="1.2.826.0.1.3680043.8.498.9"), 0.9, 1, RUN)
    other = sr.build_report(_image(StudyInstanceUID="1.2.826.0.1.3680043.8.498.8"), 0.9, 1, RUN)
    assert first.SeriesInstanceUID == second.SeriesInstanceUID != other.SeriesInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.SeriesNumber == second.SeriesNumber == other.SeriesNumber == RUN.series_number
    assert first.StudyInstanceUID == SOURCE["StudyInstanceUID"]  # the source's study
    assert first.SeriesInstanceUID != SOURCE["SeriesInstanceUID"]


def test_series_number_and_description_are_valid_and_tell_runs_apart() -> None:
    long_id = "a\\very/long model identifier " * 4
    runs = [RUN, dataclasses.replace(RUN, model_id=long_id), dataclasses.replace(RUN, options={})]
    for run in runs:
        assert 1 <= run.series_number <= 2**31 - 1
        description = run.series_description
        assert description.startswith("xray-score ") and description.endswith(run.digest[:12])
        assert len(description) <= 64 and "\\" not in description
    assert RUN.series_description != dataclasses.replace(RUN, options={}).series_description


# --- content ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "finding"),
    [(0.1 + 0.2, 1), (float(np.float32(0.7)), 0), (1e-300, None), (0.0, 0), (1.0, 1)],
)
def test_round_trip_reads_back_score_finding_and_references(
    score: float, finding: int | None
) -> None:
    got = _round_trip(SOURCE, score, finding)
    assert got == {
        "study_instance_uid": SOURCE["StudyInstanceUID"],
        "series_instance_uid": RUN.series_uid(SOURCE["StudyInstanceUID"]),
        "sop_instance_uid": RUN.sop_uid(*(SOURCE[k] for k in sr.SOURCE_UIDS)),
        "referenced_sop_class_uid": SOURCE["SOPClassUID"],
        "referenced_sop_instance_uid": SOURCE["SOPInstanceUID"],
        "score": score,  # exact: the FD Floating Point Value, not the 16-char DS
        "finding": finding,
        "model_id": RUN.model_id,
        "model_version": RUN.model_digest,
        "patient_id": SOURCE["PatientID"],
    }


def test_read_report_takes_a_dataset_as_well() -> None:
    ds = sr.build_report(SOURCE, 0.25, 0, RUN)
    assert sr.read_report(ds) == sr.read_report(sr.encode(ds))


def test_a_numpy_float32_score_is_stored_as_that_value() -> None:
    assert _round_trip(SOURCE, np.float32(0.7), 1)["score"] == float(np.float32(0.7))  # type: ignore[arg-type]


def test_header_modules_flags_evidence_and_algorithm() -> None:
    ds = sr.build_report(SOURCE, 0.25, 1, RUN)
    assert (ds.Modality, ds.Manufacturer, ds.InstanceNumber) == ("SR", "xray-pipelines", 1)
    assert (ds.CompletionFlag, ds.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert ds.SeriesDescription == RUN.series_description
    assert (ds.PatientName, ds.PatientID, ds.StudyDate) == (
        "Quaresma^Ottilie^Maud",
        *[SOURCE[k] for k in ("PatientID", "StudyDate")],
    )
    assert (ds.AccessionNumber, ds.StudyID) == (SOURCE["AccessionNumber"], SOURCE["StudyID"])
    (study,) = ds.CurrentRequestedProcedureEvidenceSequence
    (series,) = study.ReferencedSeriesSequence
    (image,) = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (
        SOURCE["StudyInstanceUID"],
        SOURCE["SeriesInstanceUID"],
    )
    assert (image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID) == (
        SOURCE["SOPClassUID"],
        SOURCE["SOPInstanceUID"],
    )
    data = sr.encode(ds)
    for expected in (
        "Probability of abnormal",
        "99XRAYPIPE",
        "Algorithm Version",
        "threshold=0.5",
        'resize_policy="pad"',
        "Radiographic imaging procedure",
        "Device Observer Name",
        "Source of Measurement",
    ):
        assert expected.encode() in data, expected


def _codes(ds: Dataset) -> list[tuple[str, str]]:
    """(concept name, value) code pairs of every CODE item in the content tree."""
    found = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "CODE":
            found.append(
                (item.ConceptNameCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodeValue)
            )
        found += _codes(item)
    return found


def test_finding_is_a_coded_evaluation_and_none_means_no_evaluation() -> None:
    assert ("121071", "263654008") in _codes(sr.build_report(SOURCE, 0.9, 1, RUN))
    assert ("121071", "17621005") in _codes(sr.build_report(SOURCE, 0.1, 0, RUN))
    none = sr.build_report(SOURCE, 0.9, None, dataclasses.replace(RUN, threshold=None))
    assert not [pair for pair in _codes(none) if pair[0] == "121071"]
    assert "threshold=null" in str(none)
    with pytest.raises(ValueError, match="finding"):
        sr.build_report(SOURCE, 0.9, 2, RUN)


def test_empty_and_invalid_source_values_become_empty_elements() -> None:
    bare = {k: SOURCE[k] for k in sr.REQUIRED_SOURCE}
    ds = sr.build_report(bare, 0.5, 1, RUN)
    assert (ds.PatientName, ds.PatientID, ds.StudyDate, ds.AccessionNumber) == ("", "", "", "")
    odd = _image(StudyDate="2024-01-02", PatientSex="female", PatientID="a\\b", StudyTime="25h")
    ds = sr.build_report(odd, 0.5, 1, RUN)
    assert (ds.StudyDate, ds.PatientSex, ds.PatientID, ds.StudyTime) == ("", "", "", "")
    assert ds.PatientName == SOURCE["PatientName"]  # the valid values stay


def test_text_outside_ascii_is_utf8() -> None:
    data = sr.encode(sr.build_report(_image(PatientName="Müller^Jürgen"), 0.5, 1, RUN))
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.SpecificCharacterSet == "ISO_IR 192" and back.PatientName == "Müller^Jürgen"
    run = dataclasses.replace(RUN, model_id="modèle-thorax")
    data = sr.encode(sr.build_report(SOURCE, 0.5, 1, run))
    assert sr.read_report(data)["model_id"] == "modèle-thorax"
    ascii_only = pydicom.dcmread(io.BytesIO(sr.encode(sr.build_report(SOURCE, 0.5, 1, RUN))))
    assert "SpecificCharacterSet" not in ascii_only


def test_scores_and_findings_that_cannot_be_reported_are_refused() -> None:
    for score in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="score"):
            sr.build_report(SOURCE, score, 1, RUN)
    no_threshold = dataclasses.replace(RUN, threshold=None)
    with pytest.raises(ValueError, match="threshold"):
        sr.build_report(SOURCE, 0.5, 1, no_threshold)
    with pytest.raises(ValueError, match="model"):
        sr.ReportRun("", "ab" * 32, 0.5, {})
    with pytest.raises(ValueError, match="model"):
        sr.ReportRun("m", "", 0.5, {})


def test_a_numpy_threshold_is_the_same_run_as_its_float() -> None:
    as_numpy = dataclasses.replace(RUN, threshold=np.float64(0.5))  # type: ignore[arg-type]
    assert as_numpy.digest == RUN.digest and as_numpy.parameters == RUN.parameters


def test_encode_writes_part10_explicit_little_endian() -> None:
    data = sr.encode(sr.build_report(SOURCE, 0.5, 1, RUN))
    assert data[128:132] == b"DICM"
    meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.MediaStorageSOPInstanceUID == RUN.sop_uid(*(SOURCE[k] for k in sr.SOURCE_UIDS))


# --- sources no SR can reference ---------------------------------------------------------


@pytest.mark.parametrize("keyword", sr.REQUIRED_SOURCE)
def test_source_problem_names_a_missing_or_invalid_uid_never_its_value(keyword: str) -> None:
    assert sr.source_problem(SOURCE) is None
    missing = {k: v for k, v in SOURCE.items() if k != keyword}
    for source in (missing, _image(**{keyword: ""})):
        problem = sr.source_problem(source)
        assert problem is not None and keyword in problem
        with pytest.raises(ValueError, match=keyword):
            sr.build_report(source, 0.5, 1, RUN)
    bad = "1.2.03.4x-" + SOURCE["SOPInstanceUID"]
    problem = sr.source_problem(_image(**{keyword: bad}))
    assert problem is not None and keyword in problem and bad not in problem
    too_long = "1." + "2" * 70
    assert sr.source_problem(_image(**{keyword: too_long})) is not None


# --- pseudonymized runs ------------------------------------------------------------------

PSEUDONYM = Pseudonymizer(b"a test key of at least 16 bytes")


def test_pseudonymous_source_is_valid_deterministic_and_keeps_what_it_should() -> None:
    fake = sr.pseudonymous_source(SOURCE, PSEUDONYM)
    assert set(fake) == set(sr.SOURCE_KEYWORDS)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert fake[keyword].startswith("2.25.") and UID(fake[keyword]).is_valid
        assert fake[keyword] != SOURCE[keyword]
    assert fake["PatientID"] == PSEUDONYM(SOURCE["PatientID"])
    assert fake["PatientName"] == PSEUDONYM(SOURCE["PatientName"])  # one family-name component
    assert len(fake["StudyID"]) == len(fake["AccessionNumber"]) == 16
    for keyword in ("PatientBirthDate", "IssuerOfPatientID", "ReferringPhysicianName"):
        assert fake[keyword] == ""
    for keyword in ("StudyDate", "StudyTime", "PatientSex", "SOPClassUID"):
        assert fake[keyword] == SOURCE[keyword]
    assert sr.pseudonymous_source(SOURCE, PSEUDONYM) == fake
    assert sr.source_problem(fake) is None
    empty = sr.pseudonymous_source({k: SOURCE[k] for k in sr.REQUIRED_SOURCE}, PSEUDONYM)
    assert empty["PatientID"] == empty["AccessionNumber"] == ""
    assert "Extra" not in sr.pseudonymous_source({**SOURCE, "Extra": "x"}, PSEUDONYM)


def test_pseudonymized_report_carries_no_original_identifier() -> None:
    run = dataclasses.replace(RUN, pseudonymized=PSEUDONYM.fingerprint)
    data = sr.encode(sr.build_report(sr.pseudonymous_source(SOURCE, PSEUDONYM), 0.5, 1, run))
    identifying = [
        k
        for k in sr.SOURCE_KEYWORDS
        if k not in ("StudyDate", "StudyTime", "PatientSex", "SOPClassUID")
    ]
    for keyword in identifying:
        assert SOURCE[keyword].encode() not in data, keyword
    for part in ("Quaresma", "Ottilie", "Vandermeer", "771001", "771003", "1951"):
        assert part.encode() not in data, part
    assert sr.read_report(data)["patient_id"] == PSEUDONYM(SOURCE["PatientID"])
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.PatientIdentityRemoved == "YES"
    assert PSEUDONYM.fingerprint in back.DeidentificationMethod
    plain = pydicom.dcmread(io.BytesIO(sr.encode(sr.build_report(SOURCE, 0.5, 1, RUN))))
    assert "PatientIdentityRemoved" not in plain


# --- validity and refusal ----------------------------------------------------------------


@needs_dciodvfy
@pytest.mark.parametrize(
    "case", ["full", "no_finding", "pseudonymized", "only_uids", "odd_values", "utf8"]
)
def test_dciodvfy_reports_no_error(case: str, tmp_path: Path) -> None:
    source, run = dict(SOURCE), RUN
    finding: int | None = 1
    if case == "no_finding":
        run, finding = dataclasses.replace(RUN, threshold=None), None
    elif case == "pseudonymized":
        source = sr.pseudonymous_source(SOURCE, PSEUDONYM)
        run = dataclasses.replace(RUN, pseudonymized=PSEUDONYM.fingerprint)
    elif case == "only_uids":
        source = {k: SOURCE[k] for k in sr.REQUIRED_SOURCE}
    elif case == "odd_values":
        source = _image(StudyDate="2024-01-02", PatientSex="female", AccessionNumber="x" * 20)
    elif case == "utf8":
        source = _image(PatientName="Müller^Jürgen", ReferringPhysicianName="Ångström^Åsa")
        run = dataclasses.replace(RUN, options={"site": "Zürich"})
    data = sr.encode(sr.build_report(source, 0.123456789, finding, run))
    assert _dciodvfy_errors(data, tmp_path) == []


def _foreign_sr() -> Dataset:
    """Our SR with another writer's name on it."""
    ds = sr.build_report(SOURCE, 0.5, 1, RUN)
    ds.Manufacturer = "someone else"
    return ds


def _image_dataset() -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SOURCE["SOPClassUID"], SOURCE["SOPInstanceUID"]
    ds.PatientID = "x"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _without_score() -> Dataset:
    ds = sr.build_report(SOURCE, 0.5, 1, RUN)
    group = ds.ContentSequence[-1].ContentSequence[0]
    group.ContentSequence = [i for i in group.ContentSequence if i.ValueType != "NUM"]
    return ds


def _not_dicom() -> bytes:
    return b"\x00" * 128 + b"not a DICOM file at all"


@pytest.mark.parametrize("make", [_foreign_sr, _image_dataset, _without_score, _not_dicom])
def test_read_report_refuses_what_this_module_did_not_write(make: Any) -> None:
    with pytest.raises(ValueError):
        sr.read_report(make())


# --- ReportBuilder: the fast path must write the reference's bytes ------------------------

#: Elements whose values come from the clock (a template is built before the reference).
CLOCK = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime")
NO_THRESHOLD = dataclasses.replace(RUN, threshold=None)
PSEUDONYMIZED = dataclasses.replace(RUN, pseudonymized=PSEUDONYM.fingerprint)
SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
    "1.2.840.10008.5.1.4.1.1.1",  # CR
)
SCORES = (0.0, 1.0, 1e-7, 0.123456789, 0.1 + 0.2, float(np.float32(0.7)), 1e-300, 0.5)


def _without_clock(data: bytes) -> bytes:
    """``data`` re-encoded with the clock-derived values blanked (the rest is written raw)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword in CLOCK:
        setattr(ds, keyword, "")
    for item in ds.ContributingEquipmentSequence:
        item.ContributionDateTime = ""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _varied_sources() -> list[dict[str, str]]:
    """Sources over 3 studies, 2 series each, 3 SOP classes, with every kind of value."""
    variants: list[dict[str, str]] = [
        {},
        {k: "" for k in sr.SOURCE_KEYWORDS if k not in sr.REQUIRED_SOURCE},  # empty values
        {"StudyDate": "2024-01-02", "PatientSex": "female", "StudyTime": "25h"},  # blanked
        {"PatientID": "a\\b", "AccessionNumber": "x" * 20, "PatientBirthDate": "1951"},
        {"PatientName": "Müller^Jürgen"},
        {"ReferringPhysicianName": "Ångström^Åsa", "PatientSex": "M"},
        {"PatientName": "ANONYMOUS", "StudyID": "", "IssuerOfPatientID": ""},
    ]
    sources = []
    for n in range(36):
        study = f"1.2.826.0.1.3680043.8.498.{100 + n % 3}"
        source = _image(
            StudyInstanceUID=study,
            SeriesInstanceUID=f"{study}.{n % 2}",
            SOPClassUID=SOP_CLASSES[n % 3],
            SOPInstanceUID=f"{study}.{n % 2}.{n}",
            **variants[n % len(variants)],
        )
        if n % 7 == 6:
            source = {k: source[k] for k in sr.REQUIRED_SOURCE}
        if n % 5 == 4:
            source = sr.pseudonymous_source(source, PSEUDONYM)
        sources.append(source)
    return sources


@pytest.mark.parametrize("run", [RUN, NO_THRESHOLD, PSEUDONYMIZED], ids=["run", "none", "pseudo"])
def test_builder_writes_the_bytes_of_build_report_in_any_order(run: sr.ReportRun) -> None:
    findings: tuple[int | None, ...] = (None,) if run.threshold is None else (1, 0, None)
    cases = [
        (source, SCORES[n % len(SCORES)], findings[n % len(findings)])
        for n, source in enumerate(_varied_sources())
    ]
    cases.reverse()  # the first template is not the one most cases use
    builder = sr.ReportBuilder(run)
    for source, score, finding in cases:
        fast = builder.encoded(source, score, finding)
        reference = sr.encode(sr.build_report(source, score, finding, run))
        assert _without_clock(fast) == _without_clock(reference)
        assert sr.read_report(fast) == sr.read_report(reference)
        assert sr.read_report(fast)["score"] == score


def test_builder_refuses_what_build_report_refuses() -> None:
    bad: list[tuple[sr.ReportRun, dict[str, str], float, Any]] = [
        (RUN, _image(SOPInstanceUID=""), 0.5, 1),
        (RUN, _image(StudyInstanceUID="1.2.03"), 0.5, 1),
        (RUN, SOURCE, float("nan"), 1),
        (RUN, SOURCE, float("inf"), 0),
        (RUN, SOURCE, 0.5, 2),
        (NO_THRESHOLD, SOURCE, 0.5, 1),
    ]
    for run, source, score, finding in bad:
        with pytest.raises(ValueError) as expected:
            sr.build_report(source, score, finding, run)
        with pytest.raises(ValueError) as got:
            sr.ReportBuilder(run).encoded(source, score, finding)
        assert str(got.value) == str(expected.value)


@needs_dciodvfy
def test_patched_reports_pass_dciodvfy(tmp_path: Path) -> None:
    builder = sr.ReportBuilder(RUN)
    sources = _varied_sources()
    for source in sources[:6]:
        builder.encoded(source, 0.9, 1)  # the templates are built, and patched since
    for n, source in enumerate(sources[6:13]):
        data = builder.encoded(source, SCORES[n], (0, 1, None)[n % 3])
        assert _dciodvfy_errors(data, tmp_path) == [], n


def _raw_and_decoded(ds: Dataset) -> tuple[int, int]:
    """How many elements of ``ds`` are still raw bytes, and how many are decoded values."""
    raw = decoded = 0
    for elem in ds.values():
        if elem.is_raw:
            raw += 1
            continue
        decoded += 1
        for item in elem.value if elem.VR == "SQ" else []:
            counts = _raw_and_decoded(item)
            raw, decoded = raw + counts[0], decoded + counts[1]
    return raw, decoded


def test_builder_keeps_the_constant_parts_encoded() -> None:
    """The speed guard: pydicom writes the template's constant parts as the bytes they are.

    Were pydicom to decode them (it does when a dataset's original encoding looks other
    than the one it is written in), the bytes would stay right and reports would cost
    several times more. Decoded: the values set per image and the sequences holding them.
    """
    builder = sr.ReportBuilder(RUN)
    for n, source in enumerate(_varied_sources()[:4]):
        builder.encoded(source, 0.5, n % 2)
    (template,) = builder._templates.values()
    raw, decoded = _raw_and_decoded(template.report)
    assert raw >= 2 * decoded, (raw, decoded)
