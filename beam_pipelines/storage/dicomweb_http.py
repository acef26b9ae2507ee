"""The HTTP side of :mod:`beam_pipelines.storage.dicomweb`: sessions, credentials, retries, parsing.

Per process: one ``requests.Session`` per thread and settings (connections
are reused), one semaphore per settings bounding the requests in flight.
Retries are our own loop, not urllib3's ``Retry``, whose warnings print the
URL (UIDs); no exception raised here carries a URL or a credential, and
``requests``' own exceptions (which do) are never chained visibly.
"""

from __future__ import annotations

import dataclasses
import email.message
import email.utils
import errno
import http
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import requests
import requests.adapters
import requests.auth
import urllib3.exceptions

from beam_pipelines.storage.dicomweb import (
    PASSWORD_ENV,
    TOKEN_ENV,
    USER_ENV,
    DicomwebSettings,
    FetchFailed,
    TooLarge,
)

_LOG = logging.getLogger(__name__)
T = TypeVar("T")

#: WADO-RS: the instance as stored (any transfer syntax), one part per instance.
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
QIDO_ACCEPT = "application/dicom+json"
# Instances travel unzipped: gzip on the fly made a local Orthanc send a 34 MB
# instance in 1.98 s instead of 0.27 s (docs/decisions/dicomweb_fetch.md), and
# most archives' pixel data is compressed already. Search answers (JSON) zip well.
_WADO_HEADERS = {"Accept": WADO_ACCEPT, "Accept-Encoding": "identity"}
_QIDO_HEADERS = {"Accept": QIDO_ACCEPT}
#: The longest a server's Retry-After is waited for.
RETRY_AFTER_CAP_S = 60.0
#: Room for a multipart answer's boundaries and part headers around the instance.
_MULTIPART_SLACK = 64 << 10
#: The largest QIDO page read (a page of 1000 instances is a few MB).
_MAX_PAGE_BYTES = 256 << 20
#: Used for a path fetched without settings: no credentials, default timeouts and retries.
_ANONYMOUS = DicomwebSettings(url="http://anonymous.invalid")


class _Transient(Exception):
    """A failed attempt worth repeating: ``problem`` names it without a URL."""

    def __init__(self, problem: str, status: int | None = None, wait: float | None = None):
        super().__init__(problem)
        self.problem, self.status, self.wait = problem, status, wait


class _Bearer(requests.auth.AuthBase):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request


class _PerThread(threading.local):
    pid = -1
    sessions: dict[DicomwebSettings, requests.Session]


_thread = _PerThread()
_lock = threading.Lock()
_slots: dict[tuple[int, DicomwebSettings], threading.BoundedSemaphore] = {}
_credentials_cache: dict[DicomwebSettings, requests.auth.AuthBase | None] = {}


def _session(settings: DicomwebSettings) -> requests.Session:
    """This thread's session for ``settings`` (a forked child makes its own)."""
    if _thread.pid != os.getpid():
        _thread.pid, _thread.sessions = os.getpid(), {}
    session = _thread.sessions.get(settings)
    if session is None:
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(
            pool_connections=1, pool_maxsize=settings.max_connections, max_retries=0
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        _thread.sessions[settings] = session
    return session


def _slot(settings: DicomwebSettings) -> threading.BoundedSemaphore:
    """The process's semaphore for ``settings`` (keyed by pid: a fork may copy a held one)."""
    key = (os.getpid(), settings)
    with _lock:
        slot = _slots.get(key)
        if slot is None:
            slot = _slots[key] = threading.BoundedSemaphore(settings.max_connections)
        return slot


def credentials(settings: DicomwebSettings) -> requests.auth.AuthBase | None:
    """The auth ``settings`` point at, read once per process.

    Raises:
        FetchFailed: an unreadable or empty token file (``status`` None).
    """
    with _lock:
        if settings in _credentials_cache:
            return _credentials_cache[settings]
    auth: requests.auth.AuthBase | None = None
    if settings.token_file is not None:
        from beam_pipelines.storage import files

        try:
            token = files.read_bytes(settings.token_file).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise FetchFailed(
                f"cannot read the DICOMweb token file ({type(exc).__name__})"
            ) from None
        if not token:
            raise FetchFailed("the DICOMweb token file is empty")
        auth = _Bearer(token)
    elif os.environ.get(TOKEN_ENV, "").strip():
        auth = _Bearer(os.environ[TOKEN_ENV].strip())
    elif os.environ.get(USER_ENV):
        auth = requests.auth.HTTPBasicAuth(os.environ[USER_ENV], os.environ.get(PASSWORD_ENV, ""))
    with _lock:
        _credentials_cache[settings] = auth
    return auth


def forget_credentials() -> None:
    """Credentials are read again at the next request (after a rotation; in tests)."""
    with _lock:
        _credentials_cache.clear()


def _request(
    settings: DicomwebSettings,
    url: str,
    params: dict[str, Any] | None,
    headers: dict[str, str],
    authorized: bool,
    consume: Callable[[requests.Response, float], T],
    missing: str,
    body: bytes | None = None,
    answered: Callable[[int], bool] = lambda status: 200 <= status < 300,
) -> T:
    """GETs ``url`` (POSTs ``body``), hands the answer to ``consume``, retries transient failures.

    ``consume`` gets every answer whose status ``answered`` accepts (2xx by
    default); any other final status raises :class:`FetchFailed`. A retried
    POST sends the same ``body`` again.
    """
    attempts = settings.retries + 1
    failure = _Transient("no attempt")
    call = _Call(url, params, headers, authorized, body, answered)
    for attempt in range(attempts):
        if attempt:
            time.sleep(_delay(settings, attempt, failure.wait))
        try:
            with _slot(settings):
                return _attempt(settings, call, consume, missing)
        except _Transient as transient:
            failure = transient
            _LOG.debug("DICOMweb request failed (%s), attempt %d", failure.problem, attempt + 1)
    plural = "s" if attempts > 1 else ""
    raise FetchFailed(f"{failure.problem} after {attempts} attempt{plural}", failure.status)


@dataclasses.dataclass(frozen=True)
class _Call:
    """One request as :func:`_attempt` makes it (the same for every attempt)."""

    url: str
    params: dict[str, Any] | None
    headers: dict[str, str]
    authorized: bool
    body: bytes | None
    answered: Callable[[int], bool]


def _delay(settings: DicomwebSettings, attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(max(retry_after, 0.0), RETRY_AFTER_CAP_S)
    # Jitter, so workers that failed together do not retry together.
    return settings.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)


def _attempt(
    settings: DicomwebSettings,
    call: _Call,
    consume: Callable[[requests.Response, float], T],
    missing: str,
) -> T:
    auth = credentials(settings) if call.authorized else None
    started = time.monotonic()
    try:
        response = _session(settings).request(
            "GET" if call.body is None else "POST",
            call.url,
            params=call.params,
            data=call.body,
            headers=call.headers,
            auth=auth,
            timeout=settings.timeout_s,
            verify=settings.ca_bundle or settings.verify_tls,
            stream=True,
            allow_redirects=False,  # credentials go to the configured service only
        )
    except requests.exceptions.SSLError:
        raise FetchFailed("TLS handshake failed (check --dicomweb_ca_bundle)") from None
    except requests.exceptions.Timeout:
        raise _Transient("timed out") from None
    except requests.exceptions.ConnectionError as exc:
        raise _Transient(_connection_problem(exc)) from None
    except requests.exceptions.RequestException as exc:
        raise FetchFailed(f"request failed ({type(exc).__name__})") from None
    with response:
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}", status, _retry_after(response))
        if status == 401 and call.authorized:
            forget_credentials()  # a rotated token file is read again next time
        if call.answered(status):
            try:
                return consume(response, started + settings.timeout_s)
            except (FetchFailed, TooLarge, _Transient):
                raise
            except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
                raise _Transient("timed out while reading") from None
            except (
                requests.exceptions.RequestException,
                urllib3.exceptions.HTTPError,
                OSError,
            ) as exc:
                raise _Transient(f"the answer broke off ({type(exc).__name__})") from None
        raise FetchFailed(refusal(status, missing), status)


def refusal(status: int, missing: str) -> str:
    """The detail of a final answer; the standard phrase, never the server's text (PHI)."""
    if status in (404, 410):
        return f"HTTP {status}: {missing}"
    if status == 401:
        return "HTTP 401: not authorized (check the token or the user and password)"
    if 300 <= status < 400:
        return f"HTTP {status}: the server redirects elsewhere (redirects are not followed)"
    try:
        phrase = http.HTTPStatus(status).phrase.lower()
    except ValueError:
        phrase = "refused"
    return f"HTTP {status}: {phrase}"


def _retry_after(response: requests.Response) -> float | None:
    """A Retry-After header's wait in seconds (delta or HTTP date), None without one."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()


def _connection_problem(exc: BaseException) -> str:
    """What went wrong connecting, from the exception chain, without its URL."""
    seen: set[int] = set()
    pending: list[Any] = [exc]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError) or getattr(current, "errno", None) == (
            errno.ECONNREFUSED
        ):
            return "connection refused"
        if isinstance(current, socket.gaierror):
            return "host name not found"
        if isinstance(current, ConnectionResetError):
            return "connection reset"
        if isinstance(current, http.client.RemoteDisconnected):
            return "the server closed the connection"
        if isinstance(current, TimeoutError | socket.timeout):
            return "timed out"
        pending.extend([*current.args, current.__cause__, current.__context__])
        pending.append(getattr(current, "reason", None))
    return "connection failed"


def read_body(response: requests.Response, limit: int, deadline: float) -> bytearray:
    """The body, at most ``limit`` bytes (:class:`TooLarge` past it), before ``deadline``."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and not response.headers.get("Content-Encoding") and int(length) > limit:
        raise TooLarge(limit)
    body = bytearray()
    # read1: whatever has arrived (read(n) would wait for all n bytes, past the deadline).
    while chunk := response.raw.read1(1 << 20, decode_content=True):
        body += chunk
        if len(body) > limit:
            raise TooLarge(limit)
        if time.monotonic() > deadline:
            raise _Transient("timed out while reading")
    return body


def _content_type(value: str) -> email.message.Message:
    message = email.message.Message()
    message["Content-Type"] = value
    return message


def read_instance(response: requests.Response, deadline: float, max_bytes: int) -> bytes:
    """The one instance in a WADO-RS answer: its multipart part, or a bare application/dicom."""
    kind = _content_type(response.headers.get("Content-Type", ""))
    media = kind.get_content_type()
    if media == "application/dicom":
        return bytes(read_body(response, max_bytes, deadline))
    if media != "multipart/related":
        raise FetchFailed(f"the server answered {media[:60]}, not multipart/related")
    boundary = kind.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise FetchFailed("the server's multipart answer has no boundary")
    body = read_body(response, max_bytes + _MULTIPART_SLACK, deadline)
    data = single_part(body, boundary.encode("latin-1"))
    if len(data) > max_bytes:
        raise TooLarge(max_bytes)
    return data


def single_part(body: bytes | bytearray, boundary: bytes) -> bytes:
    """The content of the only part of a multipart body (RFC 2046), exactly.

    Raises:
        FetchFailed: no part, more than one, or a body cut short.
    """
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        start = 0
    else:
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise FetchFailed("the server's multipart answer has no part")
        start += 2
    after = start + len(delimiter)
    if body[after : after + 2] == b"--":
        raise FetchFailed("the server's multipart answer has no part")
    headers_end = body.find(b"\r\n\r\n", after)
    if headers_end < 0:
        raise FetchFailed("the server's multipart answer is cut short")
    content_start = headers_end + 4
    end = body.find(b"\r\n" + delimiter, content_start)
    if end < 0:
        raise FetchFailed("the server's multipart answer is cut short")
    following = end + 2 + len(delimiter)
    if body[following : following + 2] != b"--":
        raise FetchFailed("the server sent more than one part for one instance")
    with memoryview(body) as view:  # one copy of the part, not two
        return bytes(view[content_start:end])


def retrieve(url: str, settings: DicomwebSettings | None, max_bytes: int) -> bytes:
    """WADO-RS: the instance at ``url`` (checked to be under ``settings.url`` by the caller)."""
    return _request(
        settings or _ANONYMOUS,
        url,
        None,
        _WADO_HEADERS,
        settings is not None,
        lambda response, deadline: read_instance(response, deadline, max_bytes),
        "the instance is not on the server",
    )


def post(
    settings: DicomwebSettings,
    url: str,
    body: bytes,
    headers: dict[str, str],
    consume: Callable[[requests.Response, float], T],
    missing: str,
    answered: Callable[[int], bool],
) -> T:
    """POSTs ``body`` to ``url`` (checked to be under ``settings.url`` by the caller), with retries.

    ``consume`` reads every answer ``answered`` accepts; 429, 5xx, connection
    errors and time-outs are retried (the same bytes sent again).
    """
    return _request(settings, url, None, headers, True, consume, missing, body, answered)


def _read_page(response: requests.Response, deadline: float) -> tuple[list[dict[str, Any]], bool]:
    """A QIDO page's objects and whether the server says it cut the page short."""
    truncated = "additional results" in response.headers.get("Warning", "").lower()
    if response.status_code == 204:
        return [], truncated
    try:
        page = json.loads(bytes(read_body(response, _MAX_PAGE_BYTES, deadline)) or b"[]")
    except TooLarge:
        raise FetchFailed(f"a search page is larger than {_MAX_PAGE_BYTES} bytes") from None
    except ValueError:
        raise FetchFailed("the server's search answer is not JSON") from None
    if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
        raise FetchFailed("the server's search answer is not a list of DICOM JSON objects")
    return page, truncated


def search_pages(
    settings: DicomwebSettings,
    resource: str,
    params: dict[str, str | list[str]],
    page_size: int,
) -> Iterator[dict[str, Any]]:
    """QIDO-RS with ``limit`` / ``offset`` until a page says it is the last."""
    url = f"{settings.url}/{resource}"
    offset = 0
    while True:
        query: dict[str, Any] = {**params, "limit": str(page_size), "offset": str(offset)}
        page, truncated = _request(
            settings, url, query, _QIDO_HEADERS, True, _read_page, "no such resource on the server"
        )
        yield from page
        # More than asked for: the server ignores limit/offset and sent everything.
        if not page or len(page) > page_size or (len(page) < page_size and not truncated):
            return
        offset += len(page)


def check(settings: DicomwebSettings) -> str | None:
    """:func:`beam_pipelines.storage.dicomweb.check_server`."""
    where = settings.url
    try:
        credentials(settings)
    except FetchFailed as exc:
        return f"{exc} (--dicomweb_token_file)"
    # One retry at most: a job must not wait long to say the server is down.
    quick = dataclasses.replace(settings, retries=min(settings.retries, 1))
    try:
        next(search_pages(quick, "studies", {}, 1), None)
    except FetchFailed as exc:
        if exc.status is None:
            return f"cannot reach the DICOMweb server at {where}: {exc}"
        if exc.status in (401, 403):
            return (
                f"the DICOMweb server at {where} refused the request ({exc}): check "
                f"--dicomweb_token_file, or env {TOKEN_ENV} / {USER_ENV} + {PASSWORD_ENV}"
            )
        if exc.status in (404, 405):
            return (
                f"no DICOMweb service at {where} ({exc}): check --dicomweb_url "
                "(the service's base, e.g. http://host:8042/dicom-web)"
            )
        return f"the DICOMweb server at {where} failed a search: {exc}"
    return None
