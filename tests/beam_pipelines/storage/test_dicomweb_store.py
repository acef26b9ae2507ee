"""The STOW-RS client against a scripted local HTTP server: outcomes, retries, credentials."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import http.server
import json
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from beam_pipelines.privacy import install_log_filters
from beam_pipelines.storage import dicomweb, dicomweb_http, dicomweb_store
from beam_pipelines.storage.dicomweb import DicomwebSettings, FetchFailed
from beam_pipelines.storage.dicomweb_store import ALREADY_PRESENT, REFUSED, STORED
from tests.support.runners import free_port

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12"
SOPS = [f"1.2.826.0.1.3680043.8.498.2{i}" for i in range(3)]
# Bytes a naive multipart writer or parser trips over: CRLFs, dashes, boundary-like lines.
INSTANCES = [
    (sop, b"\x00" * 128 + b"DICM" + f"\r\n--{i}\r\n\r\n--xray-\r\n".encode() + bytes(range(256)))
    for i, sop in enumerate(SOPS)
]
TOKEN = "stow-t0ken-value"
SC = "1.2.840.10008.5.1.4.1.1.7"


@dataclasses.dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay_s: float = 0.0


@dataclasses.dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class StowServer:
    """A threaded HTTP server answering GETs and POSTs with ``respond(request)``; records them."""

    def __init__(self, respond: Callable[[Request], Reply]) -> None:
        self.seen: list[Request] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(
                    self.command, self.path, dict(self.headers), self.rfile.read(length)
                )
                fake.seen.append(request)
                reply = respond(request)
                try:
                    time.sleep(reply.delay_s)
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (time-outs)

            do_GET = do_POST = _answer  # noqa: N815 (http.server's names)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def settings(self, **changes: object) -> DicomwebSettings:
        return DicomwebSettings(self.url, **{"backoff_s": 0.01, "timeout_s": 5.0, **changes})  # type: ignore[arg-type]


@contextlib.contextmanager
def serving(respond: Callable[[Request], Reply]) -> Iterator[StowServer]:
    fake = StowServer(respond)
    thread = threading.Thread(
        target=fake.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


def scripted(*replies: Reply) -> Callable[[Request], Reply]:
    """Replies in order, the last one repeated."""
    queue = list(replies)
    return lambda request: queue.pop(0) if len(queue) > 1 else queue[0]


def _sop_item(sop: str, **more: object) -> dict[str, object]:
    item: dict[str, object] = {
        "00081150": {"vr": "UI", "Value": [SC]},
        "00081155": {"vr": "UI", "Value": [sop]},
    }
    for tag, code in more.items():
        item[tag] = {"vr": "US", "Value": [code]}
    return item


def stow_answer(
    status: int = 200,
    stored: list[str] | None = None,
    failed: dict[str, int] | None = None,
    warned: dict[str, int] | None = None,
    content_type: str | None = "application/dicom+json",
) -> Reply:
    """A STOW-RS answer: ``stored`` in ReferencedSOPSequence, ``failed`` with their codes."""
    referenced = [_sop_item(sop) for sop in stored or []]
    referenced += [_sop_item(sop, **{"00081196": code}) for sop, code in (warned or {}).items()]
    answer: dict[str, object] = {
        "00081190": {"vr": "UR", "Value": ["http://127.0.0.1/dicom-web/studies/" + STUDY]},
        "00081198": {
            "vr": "SQ",
            "Value": [_sop_item(sop, **{"00081197": code}) for sop, code in (failed or {}).items()],
        },
        "00081199": {"vr": "SQ", "Value": referenced},
    }
    headers = {"Content-Type": content_type} if content_type else {}
    return Reply(status, json.dumps(answer).encode(), headers)


def parts_of(request: Request) -> list[bytes]:
    """The parts of the multipart body the server received, exactly (RFC 2046)."""
    content_type = request.headers["Content-Type"]
    boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
    delimiter = b"\r\n--" + boundary
    body = b"\r\n" + request.body  # the first delimiter has no CRLF before it
    assert body.endswith(delimiter + b"--\r\n")
    sections = body[: -len(delimiter + b"--\r\n")].split(delimiter)
    assert sections[0] == b""
    parts = []
    for section in sections[1:]:
        headers, _, content = section.partition(b"\r\n\r\n")
        assert headers == b"\r\nContent-Type: application/dicom"
        parts.append(content)
    return parts


def store(fake: StowServer, **changes: object) -> dict[str, tuple[str, str | None]]:
    return dicomweb_store.store_instances(fake.settings(**changes), STUDY, INSTANCES)


# --- outcomes ------------------------------------------------------------------------------


def test_all_stored_and_the_body_parses_back_to_the_exact_bytes() -> None:
    with serving(scripted(stow_answer(stored=SOPS))) as fake:
        assert store(fake) == {sop: (STORED, None) for sop in SOPS}
    (request,) = fake.seen
    assert (request.method, request.path) == ("POST", f"/dicom-web/studies/{STUDY}")
    assert request.headers["Content-Type"].startswith(
        'multipart/related; type="application/dicom"; boundary='
    )
    assert request.headers["Accept"] == "application/dicom+json"
    assert parts_of(request) == [data for _, data in INSTANCES]


def test_accepted_with_failures_names_each_reason() -> None:
    failed = {SOPS[1]: 0xA700, SOPS[2]: 0x0110}
    with serving(scripted(stow_answer(202, stored=SOPS[:1], failed=failed))) as fake:
        assert store(fake) == {
            SOPS[0]: (STORED, None),
            SOPS[1]: (REFUSED, "FailureReason 0xA700 (out of resources)"),
            SOPS[2]: (REFUSED, "FailureReason 0x0110 (processing failure)"),
        }


def test_conflict_with_every_instance_failed() -> None:
    failed = {SOPS[0]: 0xA912, SOPS[1]: 0xC123, SOPS[2]: 0x1234}
    with serving(scripted(stow_answer(409, failed=failed, content_type=None))) as fake:
        assert store(fake) == {
            SOPS[0]: (REFUSED, "FailureReason 0xA912 (data set does not match SOP class)"),
            SOPS[1]: (REFUSED, "FailureReason 0xC123 (cannot understand)"),
            SOPS[2]: (REFUSED, "FailureReason 0x1234"),
        }
    assert len(fake.seen) == 1  # a final answer: not retried


def test_a_duplicate_is_already_present() -> None:
    """PS3.7's 0x0111 and the 45070 (0xB00E) Microsoft's service sends, failed or as a warning."""
    answer = stow_answer(
        202, stored=[], failed={SOPS[0]: 0x0111, SOPS[1]: 45070}, warned={SOPS[2]: 0xB00E}
    )
    with serving(scripted(answer)) as fake:
        assert store(fake) == {sop: (ALREADY_PRESENT, None) for sop in SOPS}


def test_an_instance_the_answer_does_not_mention_is_refused() -> None:
    html = Reply(200, b"<html>stored</html>", {"Content-Type": "text/html"})
    with serving(scripted(stow_answer(stored=SOPS[:2]), html)) as fake:
        assert store(fake)[SOPS[2]] == (REFUSED, "not in the server's answer")
        assert store(fake) == {sop: (REFUSED, "not in the server's answer") for sop in SOPS}


def test_a_gzipped_answer_is_read() -> None:
    """Orthanc zips its STOW answers."""
    plain = stow_answer(stored=SOPS)
    zipped = dataclasses.replace(
        plain, body=gzip.compress(plain.body), headers={**plain.headers, "Content-Encoding": "gzip"}
    )
    with serving(scripted(zipped)) as fake:
        assert store(fake) == {sop: (STORED, None) for sop in SOPS}


@pytest.mark.parametrize(
    ("reply", "phrase"),
    [
        (Reply(400), "HTTP 400: bad request"),
        (Reply(415), "HTTP 415: unsupported media type"),
        # Orthanc's own error object, which is no STOW answer.
        (Reply(415, b'{"HttpStatus": 415, "Message": "x"}'), "HTTP 415: unsupported media type"),
        # Orthanc's answer to a part that is no DICOM: both sequences, empty.
        (stow_answer(400, content_type=None), "HTTP 400: bad request"),
        (Reply(404), "HTTP 404: the server has no store service at this address"),
    ],
)
def test_a_refusal_without_a_usable_answer_refuses_every_instance(
    reply: Reply, phrase: str
) -> None:
    with serving(scripted(reply)) as fake:
        assert store(fake) == {sop: (REFUSED, phrase) for sop in SOPS}
    assert len(fake.seen) == 1


def test_nothing_to_store_sends_nothing() -> None:
    with serving(scripted(stow_answer())) as fake:
        assert dicomweb_store.store_instances(fake.settings(), STUDY, []) == {}
    assert fake.seen == []


# --- retries and time-outs -----------------------------------------------------------------


def test_unavailable_twice_then_stored_sends_the_same_body_three_times() -> None:
    with serving(scripted(Reply(503), Reply(503), stow_answer(stored=SOPS))) as fake:
        assert store(fake) == {sop: (STORED, None) for sop in SOPS}
    assert len(fake.seen) == 3
    assert len({request.body for request in fake.seen}) == 1
    assert len({request.headers["Content-Type"] for request in fake.seen}) == 1


def test_still_unavailable_after_the_retries_is_fetch_failed_with_the_status() -> None:
    with serving(scripted(Reply(503))) as fake, pytest.raises(FetchFailed) as failed:
        store(fake, retries=2)
    assert (str(failed.value), failed.value.status) == ("HTTP 503 after 3 attempts", 503)
    assert len(fake.seen) == 3


def test_retry_after_is_honoured() -> None:
    with serving(
        scripted(Reply(429, headers={"Retry-After": "1"}), stow_answer(stored=SOPS))
    ) as fake:
        started = time.monotonic()
        assert store(fake, backoff_s=0.0)[SOPS[0]] == (STORED, None)
        waited = time.monotonic() - started
    assert len(fake.seen) == 2 and 0.9 <= waited < 3


def test_retry_after_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dicomweb_http, "RETRY_AFTER_CAP_S", 0.2)
    hour = Reply(503, headers={"Retry-After": "3600"})
    with serving(scripted(hour, stow_answer(stored=SOPS))) as fake:
        started = time.monotonic()
        assert store(fake)[SOPS[0]] == (STORED, None)
    assert time.monotonic() - started < 2


def test_connection_refused_fails_after_every_attempt() -> None:
    settings = DicomwebSettings(f"http://127.0.0.1:{free_port()}/dicom-web", backoff_s=0.01)
    with pytest.raises(FetchFailed) as failed:
        dicomweb_store.store_instances(dataclasses.replace(settings, retries=2), STUDY, INSTANCES)
    assert (str(failed.value), failed.value.status) == ("connection refused after 3 attempts", None)


def test_a_hanging_server_times_out_within_the_deadline() -> None:
    with serving(scripted(Reply(delay_s=2.0))) as fake:
        started = time.monotonic()
        with pytest.raises(FetchFailed) as failed:
            store(fake, timeout_s=0.3, retries=1)
        elapsed = time.monotonic() - started
    assert (str(failed.value), failed.value.status) == ("timed out after 2 attempts", None)
    assert elapsed < 1.5 and len(fake.seen) == 2


# --- credentials ---------------------------------------------------------------------------


def test_a_bearer_token_and_basic_auth_are_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text(f"{TOKEN}\n")
    with serving(scripted(stow_answer(stored=SOPS))) as fake:
        store(fake, token_file=str(tmp_path / "token"))
        monkeypatch.setenv(dicomweb.USER_ENV, "writer")
        monkeypatch.setenv(dicomweb.PASSWORD_ENV, "pw")
        store(fake)
    assert [request.headers["Authorization"] for request in fake.seen] == [
        f"Bearer {TOKEN}",
        "Basic d3JpdGVyOnB3",  # writer:pw
    ]


def test_unauthorized_refuses_the_batch_and_reads_the_token_again(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("old-token")
    with serving(scripted(Reply(401), stow_answer(stored=SOPS))) as fake:
        settings = fake.settings(token_file=str(token))
        refused = dicomweb_store.store_instances(settings, STUDY, INSTANCES)
        token.write_text("rotated-token")
        stored = dicomweb_store.store_instances(settings, STUDY, INSTANCES)
    phrase = "HTTP 401: not authorized (check the token or the user and password)"
    assert refused == {sop: (REFUSED, phrase) for sop in SOPS}
    assert stored == {sop: (STORED, None) for sop in SOPS}
    assert [r.headers["Authorization"] for r in fake.seen] == [
        "Bearer old-token",
        "Bearer rotated-token",
    ]


@pytest.mark.parametrize("status", [302, 307, 308])
def test_a_redirect_is_not_followed_and_gets_no_credentials(
    monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    monkeypatch.setenv(dicomweb.TOKEN_ENV, TOKEN)
    with serving(scripted(stow_answer(stored=SOPS))) as other:
        moved = Reply(status, headers={"Location": f"{other.url}/studies/{STUDY}"})
        with serving(scripted(moved)) as fake, pytest.raises(FetchFailed) as failed:
            store(fake)
    assert other.seen == [] and len(fake.seen) == 1
    assert (
        str(failed.value)
        == f"HTTP {status}: the server redirects elsewhere (redirects are not followed)"
    )


def test_a_study_uid_leaving_the_service_sends_nothing() -> None:
    with serving(scripted(stow_answer())) as fake, pytest.raises(FetchFailed) as failed:
        dicomweb_store.store_instances(fake.settings(), "..", INSTANCES)
    assert (str(failed.value), failed.value.status) == (
        "not on the configured DICOMweb server",
        None,
    )
    assert fake.seen == []


# --- stored_instances ------------------------------------------------------------------------


def _instances(n: int) -> list[dict[str, object]]:
    return [{"00080018": {"vr": "UI", "Value": [f"1.2.3.{i}"]}} for i in range(n)]


def _paged(items: list[dict[str, object]], cap: int | None = None) -> Callable[[Request], Reply]:
    """limit/offset as a server does them; ``cap`` cuts pages short with PS3.18's warning."""

    def respond(request: Request) -> Reply:
        query = parse_qs(urlsplit(request.path).query)
        offset, limit = int(query["offset"][0]), int(query["limit"][0])
        headers = {"Content-Type": "application/dicom+json"}
        if cap is not None and cap < limit and offset + cap < len(items):
            headers["Warning"] = "299 fake: There are additional results that can be requested"
            limit = cap
        return Reply(200, json.dumps(items[offset : offset + limit]).encode(), headers)

    return respond


def test_stored_instances_pages_through_the_series(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dicomweb_store, "PAGE_SIZE", 3)
    items = _instances(7) + [{"00080016": {"vr": "UI", "Value": [SC]}}]  # one without a UID
    with serving(_paged(items)) as fake:
        found = dicomweb_store.stored_instances(fake.settings(), STUDY, SERIES)
    assert found == {f"1.2.3.{i}" for i in range(7)}
    assert [urlsplit(r.path).query for r in fake.seen] == [
        f"includefield=00080018&limit=3&offset={offset}" for offset in (0, 3, 6)
    ]
    assert {urlsplit(r.path).path for r in fake.seen} == {
        f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances"
    }
    with serving(_paged(_instances(5), cap=2)) as fake:  # the server cuts pages short
        assert len(dicomweb_store.stored_instances(fake.settings(), STUDY, SERIES)) == 5
    assert len(fake.seen) == 3


def test_stored_instances_of_an_unknown_series_is_empty_and_failures_raise() -> None:
    for reply in (Reply(404), Reply(204), Reply(200, b"[]")):
        with serving(scripted(reply)) as fake:
            assert dicomweb_store.stored_instances(fake.settings(), STUDY, SERIES) == set()
    with serving(scripted(Reply(500))) as fake, pytest.raises(FetchFailed) as failed:
        dicomweb_store.stored_instances(fake.settings(retries=1), STUDY, SERIES)
    assert (str(failed.value), failed.value.status) == ("HTTP 500 after 2 attempts", 500)


# --- privacy -----------------------------------------------------------------------------------


def test_no_uid_url_or_server_text_in_any_exception_detail_or_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    install_log_filters()  # what every entry point and DoFn does
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    secret = "DOE^JANE secret server text"
    chatty = stow_answer(409, failed={SOPS[0]: 0xA700, SOPS[1]: 0x0111})
    answer = json.loads(chatty.body)
    answer["00081198"]["Value"][0]["00000902"] = {"vr": "LO", "Value": [secret]}  # ErrorComment
    chatty = dataclasses.replace(chatty, body=json.dumps(answer).encode())
    replies = [
        chatty,
        Reply(400, secret.encode()),
        Reply(503),
        Reply(302, headers={"Location": "http://x/" + STUDY}),
    ]
    for reply in replies:
        with serving(scripted(reply)) as fake:
            try:
                outcomes = store(fake, retries=1)
            except FetchFailed as exc:
                texts.append("".join(traceback.format_exception(exc)))
            else:
                texts += [detail or "" for _, detail in outcomes.values()]
            url = fake.url
    refused = DicomwebSettings(f"http://127.0.0.1:{free_port()}/dicom-web", retries=0)
    for call in (
        lambda: dicomweb_store.store_instances(refused, STUDY, INSTANCES),
        lambda: dicomweb_store.stored_instances(refused, STUDY, SERIES),
    ):
        with pytest.raises(FetchFailed) as failed:
            call()
        texts.append("".join(traceback.format_exception(failed.value)))
    assert any("FailureReason 0xA700" in text for text in texts)  # the details were collected
    assert any("urllib3" in record.name for record in caplog.records)  # requests were logged
    for text in [*texts, caplog.text]:
        assert STUDY not in text and SERIES not in text
        assert not any(sop in text for sop in SOPS)
        assert url not in text and "127.0.0.1" not in text and secret not in text
