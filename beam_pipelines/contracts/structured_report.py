"""The DICOM Structured Report xray-score writes for every scored image.

One TID 1500 Measurement Report in an Enhanced SR document, placed in the source
image's study: one measurement group (TID 1501) that references the source
image and holds the score as a NUM "probability of abnormal", the finding at the
operating point (when there is one) and the algorithm (TID 4019: model id and
model card digest). docs/decisions/structured_report_template.md says why.

Everything that identifies an SR (series and SOP Instance UIDs, series number)
is derived from a :class:`ReportRun` and the source's UIDs, so a rerun or a
retried batch produces the same instances and an archive stores nothing twice.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import highdicom as hd
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import EnhancedSRStorage, ExplicitVRLittleEndian
from pydicom.valuerep import DS, EXPLICIT_VR_LENGTH_32, validate_value

#: DICOM keywords the scorer captures from each source image's header (absent -> ""):
#: the decode step keeps these (``DecodeOptions.reference_keywords``) when results are asked for.
SOURCE_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "SeriesInstanceUID",
    "SOPClassUID",
    "SOPInstanceUID",
)
#: Without these no SR can sit in the source's study and reference the image.
REQUIRED_SOURCE: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "SOPInstanceUID",
)

MANUFACTURER = "xray-pipelines"
#: Private coding scheme: no standard code means "probability that the image is abnormal".
CODING_SCHEME = "99XRAYPIPE"
SCORE_CONCEPT = Code("P-ABNORMAL", CODING_SCHEME, "Probability of abnormal")
ABNORMAL = Code("263654008", "SCT", "Abnormal")
NORMAL = Code("17621005", "SCT", "Normal")
#: A generic procedure (CID 100 is extensible): the scores are about radiographs.
PROCEDURE = Code("363680008", "SCT", "Radiographic imaging procedure")
UNITLESS = Code("1", "UCUM", "no units")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
TRACKING_TEXT = "xray-score abnormality"

#: Namespace of the name-based (version 5) UUIDs behind every UID this module derives.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "xray-pipelines structured report")
#: PS3.5 9.1: numeric components without leading zeros (matched here, since pydicom's UID
#: checks warn with the value in the message).
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
#: The source's UIDs, in the order a report's own UIDs derive from them.
SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def derived_uid(*parts: str) -> str:
    """A UID that is a function of ``parts``: "2.25." and a name-based UUID (PS3.5 B.2).

    Not ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)``: with no prefix it
    ignores the entropy and returns a random UUID.
    """
    return f"2.25.{uuid.uuid5(_NAMESPACE, json.dumps(parts)).int}"


def source_problem(source: Mapping[str, str]) -> str | None:
    """Why no SR can reference this source (a required UID missing or not valid), else None.

    The line names the keyword, never the value (UIDs are PHI).
    """
    for keyword in REQUIRED_SOURCE:
        value = source.get(keyword) or ""
        if not value:
            return f"the source has no {keyword}"
        if len(value) > 64 or not _UID.fullmatch(value):
            return f"the source's {keyword} is not a valid UID"
    return None


def pseudonymous_source(
    source: Mapping[str, str], pseudonym: Callable[[str], str]
) -> dict[str, str]:
    """The source with every identifying value replaced, in valid DICOM form.

    ``pseudonym`` is the project's Pseudonymizer (str -> 32 hex digits, "" -> "").

    - Study, Series and SOP Instance UIDs -> ``"2.25." + int(pseudonym(uid), 16)``:
      a valid UID (<= 44 chars), the same for the same original, so the SRs of one
      study still share a study and the series UIDs derived from it.
    - PatientID -> the pseudonym, as every other output of a pseudonymized job writes it,
      so SRs join with predictions; PatientName -> the same pseudonym as a single family
      name component (a name that is not the patient's but still groups by patient).
    - StudyID, AccessionNumber (SH, 16 chars) -> the first 16 pseudonym digits.
    - PatientBirthDate, IssuerOfPatientID, ReferringPhysicianName -> "": identifying and
      nothing in the results needs them.
    - StudyDate, StudyTime, PatientSex, SOPClassUID are kept: not identifying alone, and a
      user recognises a study by its date.
    - Keywords not in :data:`SOURCE_KEYWORDS` are dropped: unknown values may identify.
    """
    out = {keyword: source.get(keyword) or "" for keyword in SOURCE_KEYWORDS}
    for keyword in SOURCE_UIDS:
        digits = pseudonym(out[keyword])
        out[keyword] = f"2.25.{int(digits, 16)}" if digits else ""
    out["PatientID"] = pseudonym(out["PatientID"])
    out["PatientName"] = pseudonym(out["PatientName"])
    out["StudyID"] = pseudonym(out["StudyID"])[:16]
    out["AccessionNumber"] = pseudonym(out["AccessionNumber"])[:16]
    for keyword in ("PatientBirthDate", "IssuerOfPatientID", "ReferringPhysicianName"):
        out[keyword] = ""
    return out


@dataclasses.dataclass(frozen=True)
class ReportRun:
    """What identifies one scoring run's results (everything that changes a score or a finding).

    ``model_digest`` is the sha256 hex of the model card (or model file) bytes: the model's
    version. ``threshold`` is the operating point (None: the SR holds no finding).
    ``options`` are the other scoring options that change results (JSON-able), e.g.
    ``{"resize_policy": "pad"}``. ``pseudonymized`` is the key fingerprint when the
    identifiers are pseudonyms.
    """

    model_id: str
    model_digest: str
    threshold: float | None
    options: Mapping[str, Any]
    pseudonymized: str | None = None

    def __post_init__(self) -> None:
        if not self.model_id or not self.model_digest:
            raise ValueError("a report run needs a model id and a model digest")

    @functools.cached_property
    def digest(self) -> str:
        """sha256 hex of the canonical JSON of all fields (computed once: every UID uses it)."""
        fields = {
            "model_id": self.model_id,
            "model_digest": self.model_digest,
            "threshold": self._threshold,
            "options": dict(self.options),
            "pseudonymized": self.pseudonymized,
        }
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def series_uid(self, study_uid: str) -> str:
        """The run's series in this study: one per run and study, the same on every rerun."""
        return derived_uid(self.digest, "series", study_uid)

    def sop_uid(self, study_uid: str, series_uid: str, source_sop_uid: str) -> str:
        """The SR's SOP Instance UID for this source image, the same on every rerun.

        The source's study and series count too: archives merged or split by
        hand hold the same SOP Instance UID in two studies, and two reports
        must not share one UID.
        """
        return derived_uid(self.digest, "sop", study_uid, series_uid, source_sop_uid)

    def device_uid(self) -> str:
        """The algorithm as a device observer: one UID per model and version."""
        return derived_uid("device", self.model_id, self.model_digest)

    @property
    def series_description(self) -> str:
        """``"xray-score <model id> <digest[:12]>"`` (LO, <= 64 chars).

        How a user finds a run's series: QIDO-RS ``SeriesDescription=xray-score*`` lists
        every run; the last 12 digits tell runs apart (the model id is cut to 40 chars and
        characters LO does not allow become "_").
        """
        model = "".join(c if " " <= c <= "~" and c != "\\" else "_" for c in self.model_id)
        return f"xray-score {model[:40]} {self.digest[:12]}".strip()

    @property
    def series_number(self) -> int:
        """A deterministic Series Number in 1..2**31-1 (IS)."""
        return int(self.digest[:8], 16) % (2**31 - 1) + 1

    @property
    def _threshold(self) -> float | None:
        return None if self.threshold is None else float(self.threshold)  # numpy floats too

    @property
    def parameters(self) -> list[str]:
        """The TID 4019 algorithm parameters: the threshold and the options, as text."""
        params = [f"threshold={json.dumps(self._threshold)}"]
        for name in sorted(self.options):
            value = json.dumps(self.options[name], sort_keys=True, ensure_ascii=False)
            params.append(f"{name}={value}")
        return params


def _valid(keyword: str, value: str) -> str:
    """The value if the SR can carry it validly, else "" (type 2: empty is allowed)."""
    if not value:
        return ""
    vr = pydicom.datadict.dictionary_VR(keyword)
    if "\\" in value or (keyword == "PatientSex" and value not in ("M", "F", "O")):
        return ""
    try:
        validate_value(vr, value, pydicom.config.RAISE)
    except ValueError:
        return ""
    return value


def _values(source: Mapping[str, str]) -> dict[str, str]:
    """The source's values as the SR carries them: the required UIDs as they are, the rest
    through :func:`_valid`."""
    values = {}
    for keyword in SOURCE_KEYWORDS:
        value = source.get(keyword) or ""
        values[keyword] = value if keyword in REQUIRED_SOURCE else _valid(keyword, value)
    return values


def _evidence(values: Mapping[str, str]) -> Dataset:
    """The source image as highdicom's evidence: its patient, study and references."""
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _character_set(values: Mapping[str, str], run: ReportRun) -> str | None:
    """UTF-8 when any text is outside ASCII (names, model id, options), else the default."""
    texts = [*values.values(), run.model_id, *run.parameters]
    return None if all(text.isascii() for text in texts) else "ISO_IR 192"


def _algorithm(run: ReportRun) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=run.model_id, version=run.model_digest, parameters=run.parameters
    )


def _group(
    source: Mapping[str, str], score: float, finding: int | None, run: ReportRun
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group: source image, score, finding, algorithm."""
    sop_uid = source["SOPInstanceUID"]
    tracking = hd.sr.TrackingIdentifier(
        uid=derived_uid(run.digest, "tracking", sop_uid),
        identifier=TRACKING_TEXT,
    )
    measurement = hd.sr.Measurement(
        name=SCORE_CONCEPT, value=float(score), unit=UNITLESS, algorithm_id=_algorithm(run)
    )
    evaluations = None
    if finding is not None:
        value = ABNORMAL if finding else NORMAL
        evaluations = [hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=value)]
    image = hd.sr.SourceImageForMeasurementGroup(source["SOPClassUID"], sop_uid)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=_algorithm(run),
        measurements=[measurement],
        qualitative_evaluations=evaluations,
        source_images=[image],
    )


def _check(source: Mapping[str, str], score: float, finding: int | None, run: ReportRun) -> None:
    """The ValueErrors of :func:`build_report`."""
    problem = source_problem(source)
    if problem is not None:
        raise ValueError(problem)
    if not math.isfinite(score):
        raise ValueError("the score is not a finite number")
    if finding not in (None, 0, 1) or (finding is not None and run.threshold is None):
        raise ValueError("the finding must be 0 or 1 at the run's threshold, else None")


def build_report(
    source: Mapping[str, str], score: float, finding: int | None, run: ReportRun
) -> Dataset:
    """The SR for one scored image (raises ValueError when source_problem(source) is not None).

    ``finding`` is 1 (abnormal) or 0 (normal) at ``run.threshold``, None when the run has no
    threshold; a finding without a threshold, or a score that is not finite, is a ValueError.
    """
    _check(source, score, finding, run)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=run.device_uid(), name=run.model_id, manufacturer_name=MANUFACTURER
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE,
        imaging_measurements=[_group(source, score, finding, run)],
    )
    values = _values(source)
    evidence = _evidence(values)
    character_set = _character_set(values, run)
    name = evidence.PatientName
    # highdicom warns with the name in the message when it has no "^" (a pseudonym, or
    # "ANONYMOUS"): the name goes in after, so no log line carries it.
    evidence.PatientName = ""
    study_uid = source["StudyInstanceUID"]
    sr = hd.sr.EnhancedSR(
        evidence=[evidence],
        content=report[0],
        series_instance_uid=run.series_uid(study_uid),
        series_number=run.series_number,
        sop_instance_uid=run.sop_uid(*(source[k] for k in SOURCE_UIDS)),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=run.series_description,
        specific_character_set=character_set,
    )
    # Declares the private scheme (SOP Common), so a reader can tell whose codes these are.
    scheme = Dataset()
    scheme.CodingSchemeDesignator = CODING_SCHEME
    scheme.CodingSchemeName = "xray-pipelines codes"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    sr.PatientName = name
    if run.pseudonymized:
        # Tells receiving archives the identifiers are not the patient's (Patient module).
        sr.PatientIdentityRemoved = "YES"
        sr.DeidentificationMethod = f"xray-pipelines keyed pseudonyms, key {run.pseudonymized}"[:64]
    return sr


def encode(report: Dataset) -> bytes:
    """Part 10 bytes (preamble, file meta, Explicit VR Little Endian), as STOW-RS and files
    carry them."""
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, report, enforce_file_format=True)
    return buffer.getvalue()


def _only(items: Any, what: str) -> Dataset:
    """The one item a template must hold (else a bug)."""
    found = list(items)
    if len(found) != 1:
        raise AssertionError(f"the report template has {len(found)} {what}, not 1")
    return found[0]


def _child(parent: Dataset, value_type: str, concept: str) -> Dataset:
    """The content item of ``parent`` with this value type and concept name code value."""
    key = (value_type, concept)
    items = [
        i
        for i in parent.ContentSequence
        if (i.ValueType, i.ConceptNameCodeSequence[0].CodeValue) == key
    ]
    return _only(items, f"{value_type} {concept} items")


def _items(elem: DataElement | RawDataElement) -> list[Dataset]:
    """The items of a sequence not encoded yet, else []."""
    return list(elem.value) if isinstance(elem, DataElement) and elem.VR == "SQ" else []


def _holds(ds: Dataset, live: set[int]) -> bool:
    """Whether ``ds`` is or contains one of the ``live`` datasets (by id)."""
    return id(ds) in live or any(_holds(i, live) for e in ds.values() for i in _items(e))


def _freeze(ds: Dataset, live: set[int], encodings: str | list[str]) -> None:
    """Encodes once every element of ``ds`` that holds no ``live`` dataset: pydicom writes
    a raw element's bytes as they are, and encoding element by element is most of the
    time of a report. Setting a value later decodes that element (it stays decoded).

    Each dataset visited is marked as already in the encoding it is written in: else
    pydicom checks it again and decodes every raw element.
    """
    for elem in list(ds.values()):
        if isinstance(elem, RawDataElement) or elem.is_undefined_length:
            continue
        if any(_holds(item, live) for item in _items(elem)):
            for item in _items(elem):
                _freeze(item, live, encodings)
            continue
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, encodings)
        # the value: after the tag, the VR and the length (2 bytes, or 2 reserved and 4)
        value = fp.getvalue()[12 if elem.VR in EXPLICIT_VR_LENGTH_32 else 8 :]
        ds[elem.tag] = RawDataElement(elem.tag, elem.VR, len(value), value, 0, False, True)
    ds.set_original_encoding(False, True, ds._character_set)


class _Template:
    """A report built by :func:`build_report`, its constant parts encoded, and the
    datasets whose values change per image."""

    def __init__(self, report: Dataset) -> None:
        self.report = report
        own = ("SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")  # not the source's
        self.root_keywords = [k for k in SOURCE_KEYWORDS if k not in own and k in report]
        self.study = _only(report.CurrentRequestedProcedureEvidenceSequence, "evidence studies")
        self.series = _only(self.study.ReferencedSeriesSequence, "evidence series")
        self.image = _only(self.series.ReferencedSOPSequence, "evidence images")
        group = _child(_child(report, "CONTAINER", "126010"), "CONTAINER", "125007")
        self.tracking = _child(group, "UIDREF", "112040")
        num = _child(group, "NUM", SCORE_CONCEPT.value)
        self.measured = _only(num.MeasuredValueSequence, "measured values")
        self.finding: Dataset | None = None
        if any(item.ValueType == "CODE" for item in group.ContentSequence):
            self.finding = _only(_child(group, "CODE", "121071").ConceptCodeSequence, "codes")
        image = _child(group, "IMAGE", "121112")
        self.source_image = _only(image.ReferencedSOPSequence, "source images")
        live = [self.study, self.series, self.image, self.tracking, self.measured]
        live += [self.source_image] + ([self.finding] if self.finding is not None else [])
        _freeze(report, {id(ds) for ds in live}, report.get("SpecificCharacterSet", "iso8859"))

    def fill(
        self, values: Mapping[str, str], score: float, finding: int | None, run: str
    ) -> Dataset:
        """The report of one image, from its source ``values``; ``run`` is ReportRun.digest."""
        report = self.report
        for keyword in self.root_keywords:
            setattr(report, keyword, values[keyword])
        study, series, sop_class, sop = (values[k] for k in REQUIRED_SOURCE)
        report.SeriesInstanceUID = derived_uid(run, "series", study)  # ReportRun.series_uid
        report.SOPInstanceUID = derived_uid(run, "sop", study, series, sop)  # ReportRun.sop_uid
        report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
        self.study.StudyInstanceUID = study
        self.series.SeriesInstanceUID = series
        for image in (self.image, self.source_image):
            image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = sop_class, sop
        self.tracking.UID = derived_uid(run, "tracking", sop)  # as _group derives it
        self.measured.NumericValue = DS(score, auto_format=True)  # as highdicom formats it
        self.measured.FloatingPointValue = score
        if self.finding is not None:
            code = ABNORMAL if finding else NORMAL
            self.finding.CodeValue = code.value
            self.finding.CodingSchemeDesignator = code.scheme_designator
            self.finding.CodeMeaning = code.meaning
        return report


class ReportBuilder:
    """Builds one run's SRs fast: highdicom builds a template once; each report is the
    template with the per-image values set, encoded at once (no deep copy).

    :meth:`encoded` mutates a cached template: one builder per DoFn instance, used by one
    thread at a time.
    """

    def __init__(self, run: ReportRun) -> None:
        self._run = run
        self._digest = run.digest
        #: Templates by what changes the structure: (specific character set, no finding).
        self._templates: dict[tuple[str | None, bool], _Template] = {}

    def encoded(self, source: Mapping[str, str], score: float, finding: int | None) -> bytes:
        """Part 10 bytes equal to encode(build_report(source, score, finding, run)) except the
        creation/content date and time elements (and the contribution date-time): those say
        when the template was built. Same ValueErrors as build_report."""
        _check(source, score, finding, self._run)
        values = _values(source)
        key = (_character_set(values, self._run), finding is None)
        template = self._templates.get(key)
        if template is None:
            report = build_report(source, score, finding, self._run)
            template = self._templates[key] = _Template(report)
        return encode(template.fill(values, float(score), finding, self._digest))


def _text(item: Dataset, *names: Code) -> list[str]:
    """The values of the TEXT children with these concept names (one of each, else ValueError)."""
    values = []
    for name in names:
        found = hd.sr.utils.find_content_items(item, name=name, value_type="TEXT")
        if len(found) != 1:
            raise ValueError(f"the score has not exactly one {name.meaning}")
        values.append(str(found[0].TextValue))
    return values


def read_report(data: bytes | Dataset) -> dict[str, Any]:
    """What an SR says, read back with highdicom.

    Keys: study_instance_uid, series_instance_uid, sop_instance_uid,
    referenced_sop_class_uid, referenced_sop_instance_uid, score (float), finding (0, 1
    or None), model_id, model_version, patient_id. Raises ValueError for an SR this
    module did not write.
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data)) if isinstance(data, bytes) else data
    except (InvalidDicomError, EOFError, OSError) as error:
        raise ValueError("not a DICOM file") from error
    if ds.get("SOPClassUID") != EnhancedSRStorage or ds.get("Manufacturer") != MANUFACTURER:
        raise ValueError("not a Structured Report written by xray-score")
    sr = hd.sr.EnhancedSR.from_dataset(ds, copy=True)
    content = sr.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError("the Structured Report is not a TID 1500 Measurement Report")
    groups = content.get_image_measurement_groups()
    if len(groups) != 1:
        raise ValueError("the Structured Report does not hold exactly one measurement group")
    group = groups[0]
    measurements = group.get_measurements(name=SCORE_CONCEPT)
    images = group.source_images
    if len(measurements) != 1 or len(images) != 1:
        raise ValueError("the measurement group lacks the score or the source image")
    model_id, model_version = _text(measurements[0][0], ALGORITHM_NAME, ALGORITHM_VERSION)
    # A qualitative evaluation named "Finding" reads back as the group's finding type.
    finding_code = group.finding_type
    finding = None if finding_code is None else int(finding_code == ABNORMAL)
    return {
        "study_instance_uid": str(sr.StudyInstanceUID),
        "series_instance_uid": str(sr.SeriesInstanceUID),
        "sop_instance_uid": str(sr.SOPInstanceUID),
        "referenced_sop_class_uid": str(images[0].referenced_sop_class_uid),
        "referenced_sop_instance_uid": str(images[0].referenced_sop_instance_uid),
        "score": float(measurements[0].value),
        "finding": finding,
        "model_id": model_id,
        "model_version": model_version,
        "patient_id": str(sr.get("PatientID", "")),
    }
