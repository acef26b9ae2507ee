"""The STOW-RS client against a real PACS: Orthanc 1.10 with its DICOMweb plugin.

Skipped, with the reason, where Orthanc or the plugin is not installed.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from beam_pipelines.storage import dicomweb, dicomweb_http
from beam_pipelines.storage.dicomweb import DicomwebSettings, FetchFailed
from beam_pipelines.storage.dicomweb_store import (
    REFUSED,
    STORED,
    store_instances,
    stored_instances,
)
from tests.support.orthanc import OrthancServer, orthanc_server


def secondary_capture(study: str, series: str, sop: str, value: int = 0) -> bytes:
    """A tiny Secondary Capture instance (2x2 pixels), Part 10 bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.Modality = "STOW-TEST", "TEST^STOW", "OT"
    ds.Rows = ds.Columns = 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes([value] * 4)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def a_series(n: int = 3) -> tuple[str, str, list[tuple[str, bytes]]]:
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(n)]
    return study, series, [(sop, secondary_capture(study, series, sop)) for sop in sops]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with orthanc_server(tmp_path_factory.mktemp("orthanc") / "server") as running:
        yield running


def test_stored_instances_are_listed_and_read_back_as_sent(server: OrthancServer) -> None:
    settings = DicomwebSettings(server.dicomweb_url)
    study, series, instances = a_series()
    assert stored_instances(settings, study, series) == set()
    assert store_instances(settings, study, instances) == {
        sop: (STORED, None) for sop, _ in instances
    }
    assert stored_instances(settings, study, series) == {sop for sop, _ in instances}
    for sop, data in instances:
        path = settings.instance_path(study, series, sop)
        assert dicomweb.fetch_instance(path, settings, 1 << 20) == data


def test_storing_again_is_answered_like_a_first_store_and_keeps_the_first_bytes(
    server: OrthancServer,
) -> None:
    """What Orthanc 1.10.1 (DICOMweb plugin 1.7) says to a SOP Instance UID it holds already.

    It answers 200 with the instance in ReferencedSOPSequence and no warning,
    as for a new one, so the outcome is STORED (dicomweb_store's docstring);
    it keeps the instance it had, even when other bytes come under that UID.
    """
    settings = DicomwebSettings(server.dicomweb_url)
    study, series, instances = a_series()
    store_instances(settings, study, instances[:2])
    changed = [(sop, secondary_capture(study, series, sop, value=9)) for sop, _ in instances[:1]]
    assert store_instances(settings, study, instances) == {
        sop: (STORED, None) for sop, _ in instances
    }
    assert store_instances(settings, study, changed) == {instances[0][0]: (STORED, None)}
    assert stored_instances(settings, study, series) == {sop for sop, _ in instances}
    first_sop, first_bytes = instances[0]
    path = settings.instance_path(study, series, first_sop)
    assert dicomweb.fetch_instance(path, settings, 1 << 20) == first_bytes


def test_an_instance_of_another_study_is_refused_the_rest_stored(server: OrthancServer) -> None:
    """The stray instance fails with 0x0110 (processing failure).

    Orthanc 1.10.1 answers 409 even when another instance of the batch was
    stored (not 202); its answer lists that one in ReferencedSOPSequence.
    """
    settings = DicomwebSettings(server.dicomweb_url)
    study, series, instances = a_series(2)
    stray_sop = generate_uid()
    stray = (stray_sop, secondary_capture(generate_uid(), series, stray_sop))
    failure = (REFUSED, "FailureReason 0x0110 (processing failure)")
    assert store_instances(settings, study, [instances[0], stray]) == {
        instances[0][0]: (STORED, None),
        stray_sop: failure,
    }
    assert store_instances(settings, study, [stray]) == {stray_sop: failure}
    assert stored_instances(settings, study, series) == {instances[0][0]}


def test_a_part_that_is_no_dicom_is_a_bad_request(server: OrthancServer) -> None:
    settings = DicomwebSettings(server.dicomweb_url)
    assert store_instances(settings, generate_uid(), [("1.2.3", b"not DICOM")]) == {
        "1.2.3": (REFUSED, "HTTP 400: bad request")
    }


def test_a_stopped_server_fails_the_batch(tmp_path: Path) -> None:
    with orthanc_server(tmp_path / "server") as running:
        settings = DicomwebSettings(running.dicomweb_url, retries=1, backoff_s=0.01)
        study, series, instances = a_series(1)
        running.stop()
        for call in (
            lambda: store_instances(settings, study, instances),
            lambda: stored_instances(settings, study, series),
        ):
            with pytest.raises(FetchFailed) as failed:
                call()
            assert (str(failed.value), failed.value.status) == (
                "connection refused after 2 attempts",
                None,
            )


def test_basic_auth_against_a_server_with_a_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with orthanc_server(tmp_path / "server", users={"writer": "pw-for-tests"}) as running:
        settings = DicomwebSettings(running.dicomweb_url)
        study, series, instances = a_series(1)
        (sop, _), phrase = instances[0], "HTTP 401: not authorized"
        outcome, detail = store_instances(settings, study, instances)[sop]
        assert outcome == REFUSED and detail is not None and detail.startswith(phrase)
        with pytest.raises(FetchFailed) as failed:
            stored_instances(settings, study, series)
        assert failed.value.status == 401
        monkeypatch.setenv(dicomweb.USER_ENV, "writer")
        monkeypatch.setenv(dicomweb.PASSWORD_ENV, "pw-for-tests")
        dicomweb_http.forget_credentials()
        assert store_instances(settings, study, instances) == {sop: (STORED, None)}
        assert stored_instances(settings, study, series) == {sop}
