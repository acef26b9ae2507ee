"""The DICOMweb client against a scripted local HTTP server: retries, parsing, credentials."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import http.server
import json
import logging
import pickle
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from beam_pipelines.dicom import DicomRejected, read_source_bytes
from beam_pipelines.privacy import install_log_filters
from beam_pipelines.storage import dicomweb, dicomweb_http
from beam_pipelines.storage.dicomweb import DicomwebSettings, FetchFailed, TooLarge
from tests.support.runners import free_port

STUDY, SERIES, SOP = (
    "1.2.826.0.1.3680043.8.498.1",
    "1.2.826.0.1.3680043.8.498.2",
    "1.2.826.0.1.3680043.8.498.3",
)
# A body with what a naive parser trips over: CRLFs, dashes, a boundary-like line.
INSTANCE = b"\x00" * 128 + b"DICM" + b"\r\n--\r\n\r\n--notquite\r\n" + bytes(range(256)) * 4
TOKEN = "s3cr3t-t0ken-value"


@dataclasses.dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay_s: float = 0.0
    trickle_s: float = 0.0  # pause between the body's bytes
    cut: int = 0  # bytes of the body left unsent (the connection is closed)
    stall_s: float = 0.0  # pause after half the body


@dataclasses.dataclass
class Seen:
    path: str
    headers: dict[str, str]


def multipart(*parts: bytes, boundary: str = "b0und4ry", quoted: bool = True) -> Answer:
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
        for part in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    value = f'"{boundary}"' if quoted else boundary
    content_type = f'multipart/related; type="application/dicom"; boundary={value}'
    return Answer(body=body, headers={"Content-Type": content_type})


def page(items: list[dict[str, object]], **headers: str) -> Answer:
    return Answer(
        body=json.dumps(items).encode(),
        headers={"Content-Type": "application/dicom+json", **headers},
    )


class FakeServer:
    """A threaded HTTP server answering each GET with ``respond(seen)``; records every request."""

    def __init__(self, respond: Callable[[Seen], Answer]) -> None:
        self.seen: list[Seen] = []
        self.in_flight = self.most_in_flight = 0
        lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                seen = Seen(self.path, dict(self.headers))
                with lock:
                    fake.seen.append(seen)
                    fake.in_flight += 1
                    fake.most_in_flight = max(fake.most_in_flight, fake.in_flight)
                try:
                    answer = respond(seen)
                    time.sleep(answer.delay_s)
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    if answer.cut:
                        self.wfile.write(answer.body[: -answer.cut])
                        self.close_connection = True
                    elif answer.stall_s:
                        half = len(answer.body) // 2
                        self.wfile.write(answer.body[:half])
                        self.wfile.flush()
                        time.sleep(answer.stall_s)
                        self.wfile.write(answer.body[half:])
                    elif answer.trickle_s:
                        for byte in answer.body:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(answer.trickle_s)
                    else:
                        self.wfile.write(answer.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeouts)
                finally:
                    with lock:
                        fake.in_flight -= 1

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def settings(self, **changes: object) -> DicomwebSettings:
        return DicomwebSettings(self.url, **{"backoff_s": 0.01, "timeout_s": 5.0, **changes})  # type: ignore[arg-type]

    def instance(self, sop: str = SOP) -> str:
        return self.settings().instance_path(STUDY, SERIES, sop)


@contextlib.contextmanager
def serving(respond: Callable[[Seen], Answer]) -> Iterator[FakeServer]:
    fake = FakeServer(respond)
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


def scripted(*answers: Answer) -> Callable[[Seen], Answer]:
    """Answers in order, the last one repeated."""
    queue = list(answers)
    return lambda seen: queue.pop(0) if len(queue) > 1 else queue[0]


# --- retrieval and retries --------------------------------------------------------------


def test_an_instance_is_its_part_s_bytes_exactly_with_the_stored_syntax_asked_for() -> None:
    with serving(scripted(multipart(INSTANCE))) as fake:
        assert dicomweb.fetch_instance(fake.instance(), fake.settings(), 1 << 20) == INSTANCE
    (seen,) = fake.seen
    assert seen.path == f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances/{SOP}"
    assert seen.headers["Accept"] == dicomweb_http.WADO_ACCEPT
    assert "transfer-syntax=*" in seen.headers["Accept"]
    assert seen.headers["Accept-Encoding"] == "identity"


def test_a_gzipped_answer_is_unzipped_within_the_limit() -> None:
    plain = multipart(INSTANCE)
    zipped = dataclasses.replace(
        plain,
        body=gzip.compress(plain.body),
        headers={**plain.headers, "Content-Encoding": "gzip"},
    )
    bomb = Answer(
        body=gzip.compress(bytes(50 << 20)),
        headers={"Content-Type": "application/dicom", "Content-Encoding": "gzip"},
    )
    with serving(scripted(zipped, bomb)) as fake:
        assert dicomweb.fetch_instance(fake.instance(), fake.settings(), 1 << 20) == INSTANCE
        with pytest.raises(TooLarge):
            dicomweb.fetch_instance(fake.instance(), fake.settings(), 1 << 20)


def test_not_found_fails_at_once() -> None:
    with serving(scripted(Answer(404))) as fake, pytest.raises(FetchFailed) as failed:
        dicomweb.fetch_instance(fake.instance(), fake.settings(), 1 << 20)
    assert failed.value.status == 404 and len(fake.seen) == 1
    assert str(failed.value) == "HTTP 404: the instance is not on the server"


@pytest.mark.parametrize("status", [400, 401, 403, 410])
def test_other_refusals_fail_at_once(status: int) -> None:
    with serving(scripted(Answer(status))) as fake, pytest.raises(FetchFailed) as failed:
        dicomweb.fetch_instance(fake.instance(), fake.settings(), 1 << 20)
    assert failed.value.status == status and len(fake.seen) == 1
    assert str(failed.value).startswith(f"HTTP {status}: ")


def test_unavailable_twice_then_the_bytes() -> None:
    answers = scripted(Answer(503), Answer(503), multipart(INSTANCE))
    with serving(answers) as fake:
        assert dicomweb.fetch_instance(fake.instance(), fake.settings(), 1 << 20) == INSTANCE
    assert len(fake.seen) == 3


def test_still_unavailable_after_the_retries_says_how_often() -> None:
    with serving(scripted(Answer(503))) as fake, pytest.raises(FetchFailed) as failed:
        dicomweb.fetch_instance(fake.instance(), fake.settings(retries=4), 1 << 20)
    assert len(fake.seen) == 5
    assert (str(failed.value), failed.value.status) == ("HTTP 503 after 5 attempts", 503)


def test_too_many_requests_waits_as_long_as_retry_after_says() -> None:
    answers = scripted(Answer(429, headers={"Retry-After": "1"}), multipart(INSTANCE))
    with serving(answers) as fake:
        started = time.monotonic()
        data = dicomweb.fetch_instance(fake.instance(), fake.settings(backoff_s=0.0), 1 << 20)
        waited = time.monotonic() - started
    assert data == INSTANCE and len(fake.seen) == 2
    assert 0.9 <= waited < 3


def test_connection_refused_is_retried_then_fails_without_a_status() -> None:
    settings = DicomwebSettings(f"http://127.0.0.1:{free_port()}/dicom-web", backoff_s=0.01)
    path = settings.instance_path(STUDY, SERIES, SOP)
    with pytest.raises(FetchFailed) as failed:
        dicomweb.fetch_instance(path, dataclasses.replace(settings, retries=2), 1 << 20)
    assert (str(failed.value), failed.value.status) == ("connection refused after 3 attempts", None)


def test_a_server_too_slow_to_answer_times_out_and_is_retried() -> None:
    with serving(scripted(Answer(delay_s=1.5))) as fake:
        started = time.monotonic()
        with pytest.raises(FetchFailed) as failed:
            dicomweb.fetch_instance(fake.instance(), fake.settings(timeout_s=0.3, retries=1), 99)
    assert time.monotonic() - started < 1.5
    assert (str(failed.value), failed.value.status) == ("timed out after 2 attempts", None)
    assert len(fake.seen) == 2


def test_an_answer_broken_off_is_retried() -> None:
    broken = dataclasses.replace(multipart(INSTANCE), cut=100)
    with serving(scripted(broken, multipart(INSTANCE))) as fake:
        assert dicomweb.fetch_instance(fake.instance(), fake.settings(), 1 << 20) == INSTANCE
    assert len(fake.seen) == 2
    gave_up = pytest.raises(FetchFailed, match=r"^the answer broke off \(\w+\) after 2 attempts$")
    with serving(scripted(broken)) as fake, gave_up:
        dicomweb.fetch_instance(fake.instance(), fake.settings(retries=1), 1 << 20)
    assert len(fake.seen) == 2


def test_an_answer_stalling_mid_body_times_out() -> None:
    stalled = dataclasses.replace(multipart(INSTANCE), stall_s=1.0)
    gave_up = pytest.raises(FetchFailed, match="^timed out while reading after 2 attempts$")
    with serving(scripted(stalled)) as fake, gave_up:
        dicomweb.fetch_instance(fake.instance(), fake.settings(timeout_s=0.3, retries=1), 1 << 20)
    assert len(fake.seen) == 2


def test_a_trickling_answer_is_cut_off_at_the_timeout() -> None:
    """Each byte arrives within the read timeout; the whole answer does not."""
    answer = multipart(INSTANCE)
    with serving(scripted(dataclasses.replace(answer, trickle_s=0.01))) as fake:
        started = time.monotonic()
        with pytest.raises(FetchFailed, match="timed out while reading after 1 attempt"):
            dicomweb.fetch_instance(
                fake.instance(), fake.settings(timeout_s=0.5, retries=0), 1 << 20
            )
        assert time.monotonic() - started < 2


# --- the answer's body -------------------------------------------------------------------


@pytest.mark.parametrize("quoted", [True, False])
def test_the_boundary_may_be_quoted_or_not(quoted: bool) -> None:
    with serving(scripted(multipart(INSTANCE, boundary="a=b:c", quoted=quoted))) as fake:
        assert dicomweb.fetch_instance(fake.instance(), fake.settings(), 1 << 20) == INSTANCE


def test_a_bare_application_dicom_body_is_the_instance() -> None:
    bare = Answer(body=INSTANCE, headers={"Content-Type": "application/dicom"})
    with serving(scripted(bare)) as fake:
        assert dicomweb.fetch_instance(fake.instance(), fake.settings(), 1 << 20) == INSTANCE


def test_a_preamble_before_the_first_boundary_is_skipped() -> None:
    assert dicomweb_http.single_part(b"preamble\r\n--b\r\n\r\nDATA\r\n--b--", b"b") == b"DATA"
    assert dicomweb_http.single_part(b"--b\r\nX-A: 1\r\n\r\n\r\n\r\n--b--\r\n", b"b") == b"\r\n"


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (multipart(INSTANCE, INSTANCE), "more than one part"),
        (multipart(), "has no part"),
        (Answer(body=b"--b0und4ry\r\n\r\nDATA", headers=multipart().headers), "cut short"),
        (Answer(body=b"{}", headers={"Content-Type": "application/json"}), "application/json"),
    ],
)
def test_an_answer_that_is_not_one_instance_fails_at_once(answer: Answer, problem: str) -> None:
    with serving(scripted(answer)) as fake, pytest.raises(FetchFailed, match=problem):
        dicomweb.fetch_instance(fake.instance(), fake.settings(), 1 << 20)
    assert len(fake.seen) == 1


def test_an_instance_over_the_limit_is_too_large() -> None:
    with serving(scripted(multipart(INSTANCE))) as fake:
        with pytest.raises(TooLarge):
            dicomweb.fetch_instance(fake.instance(), fake.settings(), len(INSTANCE) - 1)
        assert dicomweb.fetch_instance(fake.instance(), fake.settings(), len(INSTANCE)) == INSTANCE
        rejected = _rejected(
            lambda: read_source_bytes(fake.instance(), 100, dicomweb=fake.settings())
        )
    assert rejected.reason == "too_large"


def test_a_huge_declared_length_is_refused_before_reading() -> None:
    huge = Answer(body=INSTANCE * 100, headers={"Content-Type": "application/dicom"})
    with serving(scripted(huge)) as fake, pytest.raises(TooLarge):
        dicomweb.fetch_instance(fake.instance(), fake.settings(), 1000)


# --- the decode step's view --------------------------------------------------------------


def _rejected(call: Callable[[], object]) -> DicomRejected:
    with pytest.raises(DicomRejected) as rejected:
        call()
    return rejected.value


def test_read_source_bytes_fetches_and_turns_failures_into_fetch_failed() -> None:
    answers = {SOP: multipart(INSTANCE), "1.9.1": Answer(404), "1.9.2": Answer(503)}
    with serving(lambda seen: answers[seen.path.rsplit("/", 1)[1]]) as fake:
        settings = fake.settings(retries=2)
        assert read_source_bytes(fake.instance(), dicomweb=settings) == INSTANCE
        gone = _rejected(lambda: read_source_bytes(fake.instance("1.9.1"), dicomweb=settings))
        down = _rejected(lambda: read_source_bytes(fake.instance("1.9.2"), dicomweb=settings))
    assert (gone.reason, gone.detail) == (
        "fetch_failed",
        "HTTP 404: the instance is not on the server",
    )
    assert (down.reason, down.detail) == ("fetch_failed", "HTTP 503 after 3 attempts")


def test_fetch_failed_survives_pickling() -> None:
    copy = pickle.loads(pickle.dumps(FetchFailed("HTTP 503 after 5 attempts", 503)))
    assert (str(copy), copy.status) == ("HTTP 503 after 5 attempts", 503)
    assert pickle.loads(pickle.dumps(TooLarge(7))).limit == 7


# --- credentials ---------------------------------------------------------------------------


def test_a_bearer_token_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(f"  {TOKEN}\n")
    with serving(scripted(multipart(INSTANCE))) as fake:
        settings = fake.settings(token_file=str(tmp_path / "token"))
        dicomweb.fetch_instance(fake.instance(), settings, 1 << 20)
    assert fake.seen[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_a_bearer_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dicomweb.TOKEN_ENV, TOKEN)
    with serving(scripted(multipart(INSTANCE))) as fake:
        dicomweb.fetch_instance(fake.instance(), fake.settings(), 1 << 20)
    assert fake.seen[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_basic_auth_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dicomweb.USER_ENV, "reader")
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, "pw")
    with serving(scripted(multipart(INSTANCE))) as fake:
        dicomweb.fetch_instance(fake.instance(), fake.settings(), 1 << 20)
    assert fake.seen[0].headers["Authorization"] == "Basic cmVhZGVyOnB3"  # reader:pw


def test_no_credentials_go_anywhere_but_the_configured_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(dicomweb.TOKEN_ENV, TOKEN)
    with (
        serving(scripted(multipart(INSTANCE))) as ours,
        serving(scripted(multipart(INSTANCE))) as other,
    ):
        elsewhere = other.instance()
        with pytest.raises(FetchFailed) as failed:
            dicomweb.fetch_instance(elsewhere, ours.settings(), 1 << 20)
        # Without settings a path is fetched, anonymously.
        assert dicomweb.fetch_instance(elsewhere, None, 1 << 20) == INSTANCE
    assert (str(failed.value), failed.value.status) == (
        "not on the configured DICOMweb server",
        None,
    )
    assert ours.seen == [] and len(other.seen) == 1
    assert "Authorization" not in other.seen[0].headers


@pytest.mark.parametrize(
    ("url", "base", "under"),
    [
        ("http://h:80/dicom-web/studies/1", "http://H/dicom-web", True),
        ("http://h/dicom-webx/studies/1", "http://h/dicom-web", False),
        ("http://h:8042/dicom-web/studies/1", "http://h:8043/dicom-web", False),
        ("https://h/dicom-web/studies/1", "http://h/dicom-web", False),
        ("http://evil/dicom-web/studies/1", "http://h/dicom-web", False),
        ("http://h@evil/dicom-web/x", "http://h/dicom-web", False),
        ("http://h/dicom-web/../admin", "http://h/dicom-web", False),
        ("http://h/dicom-web/%2e%2e/admin", "http://h/dicom-web", False),
        ("http://h/dicom-web", "http://h/dicom-web/", False),
    ],
)
def test_what_lies_under_the_service(url: str, base: str, under: bool) -> None:
    assert dicomweb.lies_under(url, base) is under


def test_redirects_are_not_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dicomweb.TOKEN_ENV, TOKEN)
    with serving(scripted(multipart(INSTANCE))) as other:
        moved = Answer(302, headers={"Location": other.instance()})
        refused = pytest.raises(FetchFailed, match="HTTP 302: the server redirects")
        with serving(scripted(moved)) as fake, refused:
            dicomweb.fetch_instance(fake.instance(), fake.settings(), 1 << 20)
    assert other.seen == []


def test_no_token_or_uid_in_messages_or_logs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    install_log_filters()  # what every entry point and decoding DoFn does
    monkeypatch.setenv(dicomweb.TOKEN_ENV, TOKEN)
    caplog.set_level(logging.DEBUG)
    messages = []
    for answer in (Answer(401), Answer(500)):
        with serving(scripted(answer)) as fake:
            with pytest.raises(FetchFailed) as failed:
                dicomweb.fetch_instance(fake.instance(), fake.settings(retries=1), 1 << 20)
            messages.append(str(failed.value))
            messages.append(dicomweb.check_server(fake.settings(retries=0)) or "")
    assert any("urllib3" in record.name for record in caplog.records)  # it did log requests
    refused = DicomwebSettings(f"http://127.0.0.1:{free_port()}/dicom-web", retries=0)
    with pytest.raises(FetchFailed) as failed:
        dicomweb.fetch_instance(refused.instance_path(STUDY, SERIES, SOP), refused, 99)
    # Nothing chained either: a logged traceback shows no request's URL.
    messages.append("".join(traceback.format_exception(failed.value)))
    for text in [*messages, caplog.text]:
        assert TOKEN not in text
        assert STUDY not in text and SOP not in text


def test_an_unreadable_token_file_fails_without_a_request(tmp_path: Path) -> None:
    with serving(scripted(multipart(INSTANCE))) as fake:
        settings = fake.settings(token_file=str(tmp_path / "absent"))
        with pytest.raises(FetchFailed, match="cannot read the DICOMweb token file"):
            dicomweb.fetch_instance(fake.instance(), settings, 1 << 20)
        assert "token file" in (dicomweb.check_server(settings) or "")
    assert fake.seen == []


# --- concurrency ---------------------------------------------------------------------------


def test_the_semaphore_bounds_requests_in_flight_per_process() -> None:
    with serving(scripted(dataclasses.replace(multipart(INSTANCE), delay_s=0.1))) as fake:
        settings = fake.settings(max_connections=2)
        results: list[bytes] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    dicomweb.fetch_instance(fake.instance(), settings, 1 << 20)
                )
            )
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == [INSTANCE] * 8
    assert fake.most_in_flight == 2


# --- QIDO-RS ---------------------------------------------------------------------------------


def _objects(n: int) -> list[dict[str, object]]:
    return [{"00080018": {"vr": "UI", "Value": [f"1.2.3.{i}"]}} for i in range(n)]


def _paged(items: list[dict[str, object]], cap: int | None = None) -> Callable[[Seen], Answer]:
    """limit/offset as a server does them; ``cap`` cuts pages short with PS3.18's warning."""

    def respond(seen: Seen) -> Answer:
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(seen.path).query)
        offset, limit = int(query["offset"][0]), int(query["limit"][0])
        if cap is not None and cap < limit and offset + cap < len(items):
            warning = "299 fake: There are additional results that can be requested"
            return page(items[offset : offset + cap], Warning=warning)
        return page(items[offset : offset + limit])

    return respond


def test_search_pages_with_limit_and_offset_until_a_short_page() -> None:
    items = _objects(7)
    with serving(_paged(items)) as fake:
        found = list(dicomweb.search(fake.settings(), "studies/1.2/instances", {}, page_size=3))
    assert found == items
    assert [s.path.split("?")[1] for s in fake.seen] == [
        "limit=3&offset=0",
        "limit=3&offset=3",
        "limit=3&offset=6",
    ]
    assert all(s.path.startswith("/dicom-web/studies/1.2/instances?") for s in fake.seen)
    assert fake.seen[0].headers["Accept"] == "application/dicom+json"


def test_search_passes_its_parameters_and_asks_past_a_full_last_page() -> None:
    items = _objects(6)
    with serving(_paged(items)) as fake:
        params = {"Modality": "DX", "includefield": ["00080060", "00200013"]}
        assert list(dicomweb.search(fake.settings(), "instances", params, page_size=3)) == items
    assert len(fake.seen) == 3  # the third page is empty
    assert "Modality=DX&includefield=00080060&includefield=00200013" in fake.seen[0].path


def test_search_goes_on_when_the_server_cuts_pages_short_and_says_so() -> None:
    items = _objects(5)
    with serving(_paged(items, cap=2)) as fake:
        assert list(dicomweb.search(fake.settings(), "instances", {}, page_size=10)) == items
    assert len(fake.seen) == 3


def test_search_of_a_server_ignoring_limit_takes_its_one_answer() -> None:
    items = _objects(5)
    with serving(scripted(page(items))) as fake:
        assert list(dicomweb.search(fake.settings(), "studies", {}, page_size=2)) == items
    assert len(fake.seen) == 1


def test_search_with_no_content_is_empty_and_garbage_fails() -> None:
    with serving(scripted(Answer(204))) as fake:
        assert list(dicomweb.search(fake.settings(), "studies", {})) == []
    html = Answer(body=b"<html>", headers={"Content-Type": "text/html"})
    not_objects = page([1, 2])  # type: ignore[list-item]
    for answer, problem in ((html, "not JSON"), (not_objects, "not a list of DICOM JSON objects")):
        with serving(scripted(answer)) as fake, pytest.raises(FetchFailed, match=problem):
            list(dicomweb.search(fake.settings(), "studies", {}))


# --- check_server ------------------------------------------------------------------------------


def test_check_server_says_none_when_the_service_answers() -> None:
    with serving(scripted(page(_objects(1)))) as fake:
        assert dicomweb.check_server(fake.settings()) is None
    assert fake.seen[0].path == "/dicom-web/studies?limit=1&offset=0"


def test_check_server_names_the_problem_and_the_flag() -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    closed = DicomwebSettings(url, backoff_s=0.01)
    assert dicomweb.check_server(closed) == (
        f"cannot reach the DICOMweb server at {url}: connection refused after 2 attempts"
    )
    with serving(scripted(Answer(401))) as fake:
        message = dicomweb.check_server(fake.settings())
        assert message is not None and "HTTP 401" in message
        assert "--dicomweb_token_file" in message and fake.url in message
    with serving(scripted(Answer(404))) as fake:
        message = dicomweb.check_server(fake.settings())
        assert message is not None and "check --dicomweb_url" in message
    with serving(scripted(Answer(500))) as fake:
        message = dicomweb.check_server(fake.settings(retries=4))
        assert (
            message
            == f"the DICOMweb server at {fake.url} failed a search: HTTP 500 after 2 attempts"
        )


# --- settings and flags --------------------------------------------------------------------------


def test_settings_check_their_url_and_name_instances() -> None:
    settings = DicomwebSettings("https://pacs.example:8443/dicom-web/")
    assert settings.url == "https://pacs.example:8443/dicom-web"
    assert settings.instance_path("1", "2", "3") == (
        "dicomweb+https://pacs.example:8443/dicom-web/studies/1/series/2/instances/3"
    )
    assert dicomweb.is_dicomweb(settings.instance_path("1", "2", "3"))
    assert not dicomweb.is_dicomweb("gs://bucket/a.dcm") and not dicomweb.is_dicomweb("a.dcm")
    for bad in ("ftp://h/x", "http:///x", "http://user:pw@h/x", "http://h/x?y=1"):
        with pytest.raises(ValueError):
            DicomwebSettings(bad)
    with pytest.raises(ValueError):
        DicomwebSettings("http://h/x", timeout_s=0)
    assert pickle.loads(pickle.dumps(settings)) == settings


def test_the_flags_make_settings_and_refuse_bad_values_naming_the_flag(tmp_path: Path) -> None:
    import argparse

    from beam_pipelines import options

    parser = argparse.ArgumentParser()
    options.add_decode_arguments(parser)
    options.add_dicomweb_arguments(parser)
    assert options.dicomweb_settings(parser.parse_args([])) is None
    assert options.decode_options(parser.parse_args([])).dicomweb is None
    args = parser.parse_args(
        ["--dicomweb_url", "https://h/dw", "--dicomweb_token_file", str(tmp_path / "t")]
        + ["--dicomweb_timeout", "7", "--dicomweb_retries", "1", "--dicomweb_connections", "9"]
        + ["--dicomweb_ca_bundle", "ca.pem", "--dicomweb_insecure"]
    )
    expected = DicomwebSettings(
        "https://h/dw", str(tmp_path / "t"), 7.0, 1, 0.5, 9, False, "ca.pem"
    )
    assert options.dicomweb_settings(args) == expected
    decoding = options.decode_options(args)
    assert decoding.dicomweb == expected
    assert pickle.loads(pickle.dumps(decoding)) == decoding  # DoFns carry it to the workers
    for flags, flag in (
        (["--dicomweb_url", "file:///x"], "--dicomweb_url"),
        (["--dicomweb_url", "http://u:p@h/x"], "--dicomweb_url"),
        (["--dicomweb_url", "http://h/x", "--dicomweb_retries", "-1"], "--dicomweb_retries"),
        (["--dicomweb_url", "http://h/x", "--dicomweb_timeout", "0"], "--dicomweb_timeout"),
        (["--dicomweb_url", "http://h/x", "--dicomweb_connections", "0"], "--dicomweb_connections"),
    ):
        with pytest.raises(ValueError, match=flag):
            options.dicomweb_settings(parser.parse_args(flags))
