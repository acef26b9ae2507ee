"""Fixtures for the storage tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from beam_pipelines.storage import dicomweb, dicomweb_http


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No DICOMweb credentials from the environment or an earlier test's cache."""
    for name in (dicomweb.TOKEN_ENV, dicomweb.USER_ENV, dicomweb.PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    dicomweb_http.forget_credentials()
    yield
    dicomweb_http.forget_credentials()
