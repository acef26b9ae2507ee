"""A real PACS for the tests: Orthanc with its DICOMweb plugin, started on a free port.

:func:`orthanc_server` runs ``/usr/sbin/Orthanc`` with a configuration of its
own (never the system service or /etc/orthanc): localhost only, its storage
in the given folder, no DICOM listener, the DICOMweb plugin at
``/dicom-web/``. The test is skipped, with the reason, where Orthanc or the
plugin is not installed (Debian: ``orthanc orthanc-dicomweb``).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.runners import free_port

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: Every transfer syntax xray-synth writes, in one small archive (load_synthetic_archive).
MIXED_ENCODINGS = (
    "explicit_le:1,implicit_le:1,big_endian:1,deflate:1,rle:1,jpegls:1,j2k:1,jpeg_baseline:1"
)


def orthanc_missing() -> str | None:
    """Why the Orthanc tests cannot run here, or None."""
    if not ORTHANC.exists():
        return f"Orthanc is not installed ({ORTHANC}; Debian package orthanc)"
    if not DICOMWEB_PLUGIN.exists():
        return f"Orthanc's DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}; orthanc-dicomweb)"
    return None


class OrthancServer:
    """A running Orthanc: its URLs, uploads, deletions, a stop and a start again."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.users = dict(users or {})
        # The fixture's own REST calls use the first user when authentication is on.
        self._auth = next(iter(self.users.items()), None)
        self._process: subprocess.Popen[bytes] | None = None
        self._config = folder / "orthanc.json"
        storage = folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "xray-pipelines-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "SaveJobs": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": False,
                # QIDO answers from the index's main tags: no file is read per result.
                "StudiesMetadata": "MainDicomTags",
                "SeriesMetadata": "MainDicomTags",
            },
        }
        self._config.write_text(json.dumps(config, indent=2))

    def start(self, timeout: float = 30.0) -> None:
        """Starts Orthanc (on the same port and storage) and waits until /system answers."""
        if self._process is not None and self._process.poll() is None:
            return
        log = (self.folder / "orthanc.log").open("ab")
        with log:
            self._process = subprocess.Popen(
                [str(ORTHANC), str(self._config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with code {self._process.returncode} at start; "
                    f"its log: {self.folder / 'orthanc.log'}"
                )
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/system", auth=self._auth, timeout=1).ok:
                    return
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(
            f"Orthanc did not answer /system within {timeout:g} s (log in {self.folder})"
        )

    def stop(self) -> None:
        """Stops Orthanc (SIGTERM, then SIGKILL after 10 s); the storage stays."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def upload(self, source: Path | bytes) -> str:
        """Stores a DICOM file (REST POST /instances); returns Orthanc's instance id."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        response = requests.post(f"{self.url}/instances", data=data, auth=self._auth, timeout=30)
        response.raise_for_status()
        return str(response.json()["ID"])

    def delete_instance(self, sop_instance_uid: str) -> None:
        """Deletes the instance with this SOP Instance UID (found through /tools/lookup)."""
        response = requests.post(
            f"{self.url}/tools/lookup", data=sop_instance_uid, auth=self._auth, timeout=30
        )
        response.raise_for_status()
        ids = [hit["ID"] for hit in response.json() if hit["Type"] == "Instance"]
        if not ids:
            raise KeyError("no such instance on the server")
        for orthanc_id in ids:
            requests.delete(
                f"{self.url}/instances/{orthanc_id}", auth=self._auth, timeout=30
            ).raise_for_status()


@contextlib.contextmanager
def orthanc_server(folder: Path, users: dict[str, str] | None = None) -> Iterator[OrthancServer]:
    """A started Orthanc storing into ``folder``, killed on leaving; skips where absent.

    ``users`` (name -> password) turns HTTP basic authentication on.
    """
    missing = orthanc_missing()
    if missing:
        pytest.skip(missing)
    server = OrthancServer(folder, users)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def synthetic_archive(folder: Path, patients: int = 6, seed: int = 7) -> list[Path]:
    """A tiny synthetic archive (seed 7: every transfer syntax xray-synth writes); its files."""
    from archive_tools import synth

    root = folder / "archive"
    synth.run(
        ["--output_dir", str(root), "--patients", str(patients), "--seed", str(seed)]
        + ["--min_size", "64", "--max_size", "96", "--workers", "1"]
        + ["--encodings", MIXED_ENCODINGS]
    )
    return sorted((root / "raw").rglob("*.dcm"))


def load_synthetic_archive(server: OrthancServer, folder: Path, patients: int = 6) -> list[Path]:
    """Writes :func:`synthetic_archive` into ``folder`` and uploads every file; returns them."""
    paths = synthetic_archive(folder, patients)
    for path in paths:
        server.upload(path)
    return paths
