"""STOW-RS: storing instances on a DICOMweb server, and listing what a series already holds.

The same :class:`~beam_pipelines.storage.dicomweb.DicomwebSettings` as
fetching (credentials, TLS, time-out, retries, the connection semaphore, no
redirects), through the one request loop of
:mod:`beam_pipelines.storage.dicomweb_http`. A batch is one POST of a
``multipart/related; type="application/dicom"`` body built once (a retry
sends the same bytes). Outcomes are per instance; their details are our own
words and codes, never the server's text, a URL or a UID (PHI).

Re-storing is harmless when SOP Instance UIDs are deterministic, but servers
say it differently. Orthanc 1.10.1 with its DICOMweb plugin 1.7 (measured
in tests/beam_pipelines/storage/test_dicomweb_store_orthanc.py) answers a
second store of a SOP Instance UID exactly like the first: 200, the
instance in ReferencedSOPSequence, no warning, and it keeps the instance it
had (other bytes under that UID are dropped silently). So from Orthanc a
re-store reads :data:`STORED`; :func:`stored_instances` before storing is
how a caller learns what is already there. Servers that do flag it (PS3.7's
0x0111 Duplicate SOP Instance; Microsoft's DICOM service: 0xB00E, 45070, in
FailedSOPSequence with a 409) read :data:`ALREADY_PRESENT`. Orthanc also
answers 409 to a batch with any failure, the stored instances listed in it
too: the answer's body, not its status, says what became of each instance.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import requests

from beam_pipelines.storage import dicomweb, dicomweb_http
from beam_pipelines.storage.dicomweb import DicomwebSettings, FetchFailed, TooLarge

STORED = "stored"
ALREADY_PRESENT = "already_present"
REFUSED = "refused"

#: QIDO page size for :func:`stored_instances` (a module constant so tests can page small).
PAGE_SIZE = 1000
#: UIDs per :func:`present_instances` search: ~45 characters each keeps the URL near 2 KB.
UIDS_PER_SEARCH = 40
STOW_ACCEPT = "application/dicom+json"
NOT_IN_ANSWER = "not in the server's answer"
#: Codes (failure or warning) that mean "this SOP Instance UID is already stored".
DUPLICATE_CODES = frozenset({0x0111, 0xB00E})
#: PS3.4 B.2.3 / PS3.7 C / PS3.18 10.5.3 status codes, as the detail names them.
_REASONS = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0117: "invalid object instance",
    0x0119: "class-instance conflict",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0213: "resource limitation",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
    0xB00E: "already stored",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}
#: Ranges PS3.4 gives a meaning as a whole (the low byte is the server's).
_RANGES = ((0xA700, "out of resources"), (0xA900, "data set does not match SOP class"))
#: The largest STOW answer read (a batch of 1000 instances answers in well under 1 MB).
_MAX_ANSWER_BYTES = 64 << 20
_SOP_SEQUENCES = ("00081199", "00081198")  # ReferencedSOPSequence, FailedSOPSequence
_MISSING = "the server has no store service at this address"

Outcome = tuple[str, str | None]


def stored_instances(settings: DicomwebSettings, study_uid: str, series_uid: str) -> set[str]:
    """SOP Instance UIDs the server already holds in that series (QIDO-RS, paged).

    A 404 (no such study or series) is an empty set.

    Raises:
        FetchFailed: the search failed after its retries, or the answer is no DICOM JSON.
    """
    resource = f"studies/{_segment(study_uid)}/series/{_segment(series_uid)}/instances"
    found: set[str] = set()
    try:
        for item in dicomweb.search(settings, resource, {"includefield": "00080018"}, PAGE_SIZE):
            uid = _first(item.get("00080018"))
            if isinstance(uid, str) and uid:
                found.add(uid)
    except FetchFailed as exc:
        if exc.status == 404 and not found:
            return set()
        raise
    return found


def present_instances(settings: DicomwebSettings, sop_uids: Sequence[str]) -> set[str]:
    """Which of these SOP Instance UIDs the server holds, in any study (one QIDO-RS search).

    The UIDs go in one search as a UID list (PS3.18: comma-separated), at
    most :data:`UIDS_PER_SEARCH` per request.

    Raises:
        FetchFailed: a search failed after its retries (``status`` says how).
    """
    found: set[str] = set()
    for start in range(0, len(sop_uids), UIDS_PER_SEARCH):
        chunk = [_segment(uid) for uid in sop_uids[start : start + UIDS_PER_SEARCH]]
        params: dict[str, str | list[str]] = {
            "SOPInstanceUID": ",".join(chunk),
            "includefield": "00080018",
        }
        for item in dicomweb.search(settings, "instances", params, PAGE_SIZE):
            uid = _first(item.get("00080018"))
            if isinstance(uid, str) and uid:
                found.add(uid)
    return found & set(sop_uids)


def store_instances(
    settings: DicomwebSettings, study_uid: str | None, instances: Sequence[tuple[str, bytes]]
) -> dict[str, Outcome]:
    """STOW-RS one batch of ``(sop_instance_uid, part10_bytes)`` to ``{url}/studies/{study_uid}``.

    Without a study UID the batch goes to ``{url}/studies`` and may hold
    instances of many studies.

    Every SOP UID given maps to ``(STORED, None)``, ``(ALREADY_PRESENT,
    None)`` or ``(REFUSED, detail)``. An answer the server gave for good (a
    2xx or 4xx) is never an exception: per-instance outcomes come from its
    ReferencedSOPSequence and FailedSOPSequence, a SOP UID it does not
    mention is refused ("not in the server's answer", or for a 4xx the
    status's standard phrase), and a 401 makes the credentials be read again.

    Raises:
        FetchFailed: the batch was not delivered: 429/5xx, connection errors
            and time-outs after the retries (``status`` the last HTTP status
            or None), a redirect, an unreadable token file, a study UID that
            leaves the configured service.
    """
    if not instances:
        return {}
    url = f"{settings.url}/studies" + (f"/{_segment(study_uid)}" if study_uid else "")
    if not dicomweb.lies_under(url, settings.url):
        raise FetchFailed("not on the configured DICOMweb server", status=None)
    parts = [data for _, data in instances]
    boundary = _boundary(parts)
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": STOW_ACCEPT,
    }
    body = multipart_body(parts, boundary)
    uids = [uid for uid, _ in instances]
    return dicomweb_http.post(
        settings,
        url,
        body,
        headers,
        lambda response, deadline: _outcomes(response, deadline, uids),
        _MISSING,
        lambda status: 200 <= status < 300 or 400 <= status < 500,
    )


def multipart_body(parts: Sequence[bytes], boundary: str) -> bytes:
    """``parts`` as one ``multipart/related`` body (RFC 2046), each an application/dicom part."""
    delimiter = b"--" + boundary.encode("ascii")
    head = delimiter + b"\r\nContent-Type: application/dicom\r\n\r\n"
    chunks: list[bytes] = []
    for part in parts:
        chunks += [head, part, b"\r\n"]
    chunks.append(delimiter + b"--\r\n")
    return b"".join(chunks)


def failure_detail(code: int) -> str:
    """``FailureReason 0xA700 (out of resources)``; an unknown code in hex only."""
    meaning = _REASONS.get(code) or next(
        (name for start, name in _RANGES if start <= code <= start + 0xFF), None
    )
    if meaning is None and 0xC000 <= code <= 0xCFFF:
        meaning = "cannot understand"
    text = f"FailureReason 0x{code:04X}"
    return f"{text} ({meaning})" if meaning else text


def _boundary(parts: Sequence[bytes]) -> str:
    """A random boundary that no part contains (RFC 2046 forbids it in the content)."""
    while True:
        boundary = f"xray-{secrets.token_hex(16)}"
        needle = boundary.encode("ascii")
        if not any(needle in part for part in parts):
            return boundary


def _segment(uid: str) -> str:
    # A UID is digits and dots; anything else is escaped rather than trusted in a path.
    return quote(uid.strip(), safe=".")


def _outcomes(response: requests.Response, deadline: float, uids: list[str]) -> dict[str, Outcome]:
    status = response.status_code
    answer = _dicom_json(response, deadline)
    outcomes: dict[str, Outcome] = {}
    if answer is not None:
        for item in _items(answer.get("00081198")):  # FailedSOPSequence
            uid, code = _first(item.get("00081155")), _code(item.get("00081197"))
            if isinstance(uid, str):
                outcomes[uid] = _failed(code)
        for item in _items(answer.get("00081199")):  # ReferencedSOPSequence: stored wins
            uid, warning = _first(item.get("00081155")), _code(item.get("00081196"))
            if isinstance(uid, str):
                outcomes[uid] = (ALREADY_PRESENT if warning in DUPLICATE_CODES else STORED, None)
    unmentioned = NOT_IN_ANSWER if status < 400 else dicomweb_http.refusal(status, _MISSING)
    return {uid: outcomes.get(uid.strip(), (REFUSED, unmentioned)) for uid in uids}


def _failed(code: int | None) -> Outcome:
    if code in DUPLICATE_CODES:
        return ALREADY_PRESENT, None
    return REFUSED, failure_detail(code) if code is not None else "FailureReason missing"


def _dicom_json(response: requests.Response, deadline: float) -> dict[str, Any] | None:
    """The answer's DICOM JSON object when it has one naming instances, else None.

    Servers differ in Content-Type (Orthanc sends none with a 409), so the
    body decides: an object holding either SOP sequence is an answer; an
    error page or another JSON (Orthanc's own error object) is not.
    """
    try:
        body = dicomweb_http.read_body(response, _MAX_ANSWER_BYTES, deadline)
    except TooLarge:
        return None
    try:
        answer = json.loads(bytes(body))
    except ValueError:
        return None
    if isinstance(answer, list) and len(answer) == 1:  # some servers wrap the object
        answer = answer[0]
    if not isinstance(answer, dict) or not any(key in answer for key in _SOP_SEQUENCES):
        return None
    return answer


def _items(element: Any) -> list[dict[str, Any]]:
    value = element.get("Value") if isinstance(element, dict) else None
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _first(element: Any) -> Any:
    value = element.get("Value") if isinstance(element, dict) else None
    return value[0] if isinstance(value, list) and value else None


def _code(element: Any) -> int | None:
    value = _first(element)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None
