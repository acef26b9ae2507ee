"""Instances on a DICOMweb server (a PACS): WADO-RS retrieval, QIDO-RS search, a reachability check.

An instance is named by a ``dicomweb+http(s)://host:port/base/studies/S/series/R/instances/I``
path (what ``xray-index`` writes into metadata.csv); :func:`fetch_instance`
returns the stored file's bytes exactly, as the archive holds them
(``transfer-syntax=*``), so they decode like the same file read from a disk
(docs/decisions/dicomweb_fetch.md).

Credentials never travel in settings, flags or URLs: :class:`DicomwebSettings`
says where to find them (a token file, else the environment), they are read
where the request is made (a Beam worker) and sent only to paths under the
configured service. No exception message or log line names an instance URL
(its UIDs are PHI) or a credential. The HTTP work (sessions, retries,
multipart parsing) is :mod:`beam_pipelines.storage.dicomweb_http`, imported
when a request is made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

#: The path schemes of DICOMweb instances: the service's scheme with ``dicomweb+`` in front.
SCHEMES: frozenset[str] = frozenset({"dicomweb+http", "dicomweb+https"})
#: Where credentials come from when no token file is given (never from flags).
TOKEN_ENV = "XRAY_DICOMWEB_TOKEN"
USER_ENV = "XRAY_DICOMWEB_USER"
PASSWORD_ENV = "XRAY_DICOMWEB_PASSWORD"


@dataclasses.dataclass(frozen=True)
class DicomwebSettings:
    """Where the DICOMweb service is and how to talk to it; picklable, holds no secret.

    Attributes:
        url: the service's base URL, ``http(s)://host:port/dicom-web`` (a
            trailing slash is dropped).
        token_file: a file holding a bearer token. Without one, the token in
            env ``XRAY_DICOMWEB_TOKEN``; else basic auth from env
            ``XRAY_DICOMWEB_USER`` and ``XRAY_DICOMWEB_PASSWORD``; else none.
        timeout_s: longest one request may take, connecting and reading.
        retries: extra attempts after a 429, a 5xx, a connection error or a
            timeout.
        backoff_s: the wait before the first retry; it doubles for each
            further one (with jitter); a server's Retry-After is honoured, up
            to a cap.
        max_connections: requests in flight at once per process (and the
            connection pool's size).
        verify_tls: check the server's certificate (False: for tests only).
        ca_bundle: a CA bundle file to check it against instead of the system's.
    """

    url: str
    token_file: str | None = None
    timeout_s: float = 30.0
    retries: int = 4
    backoff_s: float = 0.5
    max_connections: int = 4
    verify_tls: bool = True
    ca_bundle: str | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the DICOMweb URL must be http://host[:port]/path or https://...")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "the DICOMweb URL must not hold credentials: use a token file or the "
                f"{TOKEN_ENV} / {USER_ENV} + {PASSWORD_ENV} environment variables"
            )
        if parts.query or parts.fragment:
            raise ValueError("the DICOMweb URL must not have a query or fragment")
        object.__setattr__(self, "url", self.url.rstrip("/"))
        if not self.timeout_s > 0:  # also refuses NaN
            raise ValueError(f"the DICOMweb timeout must be positive, not {self.timeout_s}")
        if self.retries < 0 or self.max_connections < 1 or not self.backoff_s >= 0:
            raise ValueError("DICOMweb retries and back-off must be >= 0, connections >= 1")

    def instance_path(self, study: str, series: str, sop: str) -> str:
        """The DicomPath the index writes: ``dicomweb+<url>/studies/S/series/R/instances/I``."""
        return f"dicomweb+{self.url}/studies/{study}/series/{series}/instances/{sop}"


class FetchFailed(OSError):
    """A DICOMweb request that failed for good (after the retries it deserved).

    ``str(exc)`` is the detail ("HTTP 404: the instance is not on the
    server", "connection refused after 5 attempts"): never a URL or a
    credential. ``status`` is the last HTTP status, None when no server
    answered (connection errors, timeouts) or the request was never made.
    """

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status

    def __str__(self) -> str:
        return self.detail

    def __reduce__(self) -> tuple[Any, ...]:
        # Beam pickles exceptions across processes; keep both fields.
        return (type(self), (self.detail, self.status))


class TooLarge(OSError):
    """An instance larger than the caller's limit; reading stopped at the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the instance is larger than {limit} bytes")
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.limit,))


def is_dicomweb(path: str) -> bool:
    """True for a ``dicomweb+http(s)://`` path."""
    scheme, separator, _ = path.partition("://")
    return bool(separator) and scheme.lower() in SCHEMES


def service_url(path: str) -> str:
    """The http(s) URL of a ``dicomweb+`` path."""
    if not is_dicomweb(path):
        raise ValueError("not a dicomweb+http(s):// path")
    return path[len("dicomweb+") :]


def lies_under(url: str, base: str) -> bool:
    """True when ``url`` is on ``base``'s server (scheme, host, port) and below its path."""
    target, root = urlsplit(url), urlsplit(base)
    if target.scheme.lower() != root.scheme.lower():
        return False
    if (target.hostname or "").lower() != (root.hostname or "").lower():
        return False
    default = 443 if root.scheme.lower() == "https" else 80
    try:
        ports_match = (target.port or default) == (root.port or default)
    except ValueError:  # a port that is no number
        return False
    prefix = root.path.rstrip("/") + "/"
    # A dot segment would lead a server that resolves it out of the prefix.
    climbs = any(segment in (".", "..") for segment in unquote(target.path).split("/"))
    return ports_match and target.username is None and target.path.startswith(prefix) and not climbs


def fetch_instance(path: str, settings: DicomwebSettings | None, max_bytes: int) -> bytes:
    """The stored bytes of one instance (WADO-RS, ``transfer-syntax=*``), exactly.

    With ``settings``, ``path`` must lie under ``settings.url`` and is
    fetched with its credentials, timeout and retries; without, anonymously
    with the defaults.

    Raises:
        FetchFailed: 404/410, 401/403 and other 4xx at once; 429, 5xx,
            connection errors and timeouts after the retries; a path outside
            the configured service (``status`` None) without a request.
        TooLarge: more than ``max_bytes`` bytes (reading stops there).
    """
    from beam_pipelines.storage import dicomweb_http

    url = service_url(path)
    if settings is not None and not lies_under(url, settings.url):
        raise FetchFailed("not on the configured DICOMweb server", status=None)
    return dicomweb_http.retrieve(url, settings, max_bytes)


def search(
    settings: DicomwebSettings,
    resource: str,
    params: dict[str, str | list[str]],
    page_size: int = 1000,
) -> Iterator[dict[str, Any]]:
    """DICOM JSON objects a QIDO-RS search finds, page after page (``limit`` / ``offset``).

    ``resource`` is relative to the service: ``"studies"``,
    ``"studies/{S}/series"``, ``"studies/{S}/instances"``, ``"instances"``...
    A page shorter than ``page_size`` ends the search unless the server warns
    that it cut the page short (PS3.18's Warning header), when the next page
    is asked for too.

    Raises:
        FetchFailed: as :func:`fetch_instance`; also for an answer that is
            not a JSON list of objects.
    """
    from beam_pipelines.storage import dicomweb_http

    if page_size < 1:
        raise ValueError("page_size must be positive")
    yield from dicomweb_http.search_pages(settings, resource.strip("/"), params, page_size)


def check_server(settings: DicomwebSettings) -> str | None:
    """None when the service answers a cheap QIDO search, else a one-line problem.

    The problem names the base URL (configuration, not PHI), never a credential.
    """
    from beam_pipelines.storage import dicomweb_http

    return dicomweb_http.check(settings)
