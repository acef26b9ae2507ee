"""The DICOMweb client against a real PACS: Orthanc 1.10 with its DICOMweb plugin.

Skipped, with the reason, where Orthanc or the plugin is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from archive_tools.dicom_writer import ENCODINGS
from beam_pipelines.dicom import DecodeOptions, DicomRejected, read_image
from beam_pipelines.storage import dicomweb, dicomweb_http
from beam_pipelines.storage.dicomweb import DicomwebSettings, FetchFailed
from tests.support.orthanc import OrthancServer, load_synthetic_archive, orthanc_server

_NAMES = {uid: name for name, uid in ENCODINGS.items()}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancServer, list[Path]]]:
    """One Orthanc holding the small archive in every transfer syntax (read-only for the tests)."""
    folder = tmp_path_factory.mktemp("orthanc")
    with orthanc_server(folder / "server") as server:
        yield server, load_synthetic_archive(server, folder)


def _instance_path(settings: DicomwebSettings, file: Path) -> str:
    ds = pydicom.dcmread(file, stop_before_pixels=True)
    return settings.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def _encoding(file: Path) -> str:
    return _NAMES[pydicom.dcmread(file, stop_before_pixels=True).file_meta.TransferSyntaxUID]


def test_the_archive_holds_every_encoding(loaded: tuple[OrthancServer, list[Path]]) -> None:
    assert {_encoding(file) for file in loaded[1]} == set(ENCODINGS)


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_an_instance_comes_back_as_the_stored_bytes(
    loaded: tuple[OrthancServer, list[Path]], encoding: str
) -> None:
    """transfer-syntax=*: Orthanc sends the stored file itself, in every transfer syntax."""
    server, files = loaded
    settings = DicomwebSettings(server.dicomweb_url)
    chosen = [file for file in files if _encoding(file) == encoding]
    assert chosen
    for file in chosen:
        assert dicomweb.fetch_instance(_instance_path(settings, file), settings, 1 << 24) == (
            file.read_bytes()
        )


def test_a_fetched_instance_decodes_like_the_file(loaded: tuple[OrthancServer, list[Path]]) -> None:
    server, files = loaded
    options = DecodeOptions(dicomweb=DicomwebSettings(server.dicomweb_url))
    for file in files[:3]:
        fetched = read_image(_instance_path(options.dicomweb, file), options)  # type: ignore[arg-type]
        assert np.array_equal(fetched, read_image(str(file)))


def test_search_pages_through_every_instance(loaded: tuple[OrthancServer, list[Path]]) -> None:
    server, files = loaded
    settings = DicomwebSettings(server.dicomweb_url)
    found = list(dicomweb.search(settings, "instances", {}, page_size=4))
    assert len(files) > 8  # three pages at least
    uids = [item["00080018"]["Value"][0] for item in found]
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert len(uids) == len(set(uids)) and set(uids) == expected
    studies = list(dicomweb.search(settings, "studies", {}, page_size=2))
    study = studies[0]["0020000D"]["Value"][0]
    series = list(dicomweb.search(settings, f"studies/{study}/series", {}))
    assert series and all(s["0020000D"]["Value"][0] == study for s in series)
    assert dicomweb.check_server(settings) is None


def test_a_deleted_instance_is_not_found(tmp_path: Path) -> None:
    with orthanc_server(tmp_path / "server") as server:
        files = load_synthetic_archive(server, tmp_path, patients=1)
        settings = DicomwebSettings(server.dicomweb_url)
        path = _instance_path(settings, files[0])
        assert dicomweb.fetch_instance(path, settings, 1 << 24) == files[0].read_bytes()
        server.delete_instance(str(pydicom.dcmread(files[0]).SOPInstanceUID))
        with pytest.raises(FetchFailed) as failed:
            dicomweb.fetch_instance(path, settings, 1 << 24)
        with pytest.raises(DicomRejected) as rejected:
            read_image(path, DecodeOptions(dicomweb=settings))
    assert failed.value.status == 404
    assert (rejected.value.reason, rejected.value.detail) == (
        "fetch_failed",
        "HTTP 404: the instance is not on the server",
    )


def test_a_stopped_server_refuses_connections_and_serves_again_once_started(
    tmp_path: Path,
) -> None:
    with orthanc_server(tmp_path / "server") as server:
        files = load_synthetic_archive(server, tmp_path, patients=1)
        settings = DicomwebSettings(server.dicomweb_url, retries=1, backoff_s=0.01)
        path = _instance_path(settings, files[0])
        server.stop()
        with pytest.raises(FetchFailed) as failed:
            dicomweb.fetch_instance(path, settings, 1 << 24)
        assert (str(failed.value), failed.value.status) == (
            "connection refused after 2 attempts",
            None,
        )
        assert "cannot reach the DICOMweb server" in (dicomweb.check_server(settings) or "")
        server.start()
        assert dicomweb.fetch_instance(path, settings, 1 << 24) == files[0].read_bytes()


def test_basic_auth_against_a_server_with_a_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with orthanc_server(tmp_path / "server", users={"reader": "pw-for-tests"}) as server:
        files = load_synthetic_archive(server, tmp_path, patients=1)
        settings = DicomwebSettings(server.dicomweb_url)
        path = _instance_path(settings, files[0])
        problem = dicomweb.check_server(settings)
        assert problem is not None and "HTTP 401" in problem and "pw-for-tests" not in problem
        with pytest.raises(FetchFailed) as failed:
            dicomweb.fetch_instance(path, settings, 1 << 24)
        assert failed.value.status == 401
        monkeypatch.setenv(dicomweb.USER_ENV, "reader")
        monkeypatch.setenv(dicomweb.PASSWORD_ENV, "pw-for-tests")
        dicomweb_http.forget_credentials()
        assert dicomweb.check_server(settings) is None
        assert dicomweb.fetch_instance(path, settings, 1 << 24) == files[0].read_bytes()
