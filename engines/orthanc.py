"""A local PACS: Orthanc with its DICOMweb plugin, on a free localhost port.

``python -m engines.orthanc FOLDER [DICOM files or folders...]`` starts one,
uploads the files given, prints the ``--dicomweb_url`` for ``xray-index``,
``xray-preprocess`` and ``xray-score`` and runs until Ctrl-C; the tests and
``benchmarks/dicomweb_throughput.py`` use :class:`OrthancServer`. It runs
``/usr/sbin/Orthanc`` (Debian packages ``orthanc orthanc-dicomweb``) with a
configuration of its own, never the system service or /etc/orthanc:
localhost only, its storage in the given folder, no DICOM listener, the
DICOMweb plugin at ``/dicom-web/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from engines import procs

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_missing() -> str | None:
    """Why Orthanc cannot be started here, or None."""
    if not ORTHANC.exists():
        return f"Orthanc is not installed ({ORTHANC}; Debian package orthanc)"
    if not DICOMWEB_PLUGIN.exists():
        return f"Orthanc's DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}; orthanc-dicomweb)"
    return None


class OrthancServer:
    """A running Orthanc: its URLs, uploads, deletions, a stop and a start again."""

    def __init__(
        self, folder: Path, users: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        self.folder = folder.resolve()  # Orthanc runs in it: relative paths would break
        free, dicom_port = procs.free_ports(2)
        self.port = port or free
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.users = dict(users or {})
        # The fixture's own REST calls use the first user when authentication is on.
        self._auth = next(iter(self.users.items()), None)
        self._process: subprocess.Popen[bytes] | None = None
        self._config = self.folder / "orthanc.json"
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "xray-pipelines",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomServerEnabled": False,
            "DicomPort": dicom_port,
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

    def stop(self, graceful: bool = True) -> None:
        """Stops Orthanc (SIGTERM, then SIGKILL after 10 s); the storage stays.

        ``graceful=False`` kills it at once, as a crash would (Orthanc takes
        about 2.5 s to close its web server on SIGTERM; its storage survives a kill).
        """
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if not graceful:
            process.kill()
            process.wait()
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @contextlib.contextmanager
    def running(self) -> Iterator[OrthancServer]:
        """Started on entry, stopped on leaving (the storage stays)."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

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


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.orthanc", description=__doc__)
    parser.add_argument("folder", type=Path, help="Orthanc's storage (kept between runs)")
    parser.add_argument("upload", nargs="*", type=Path, help="DICOM files or folders to upload")
    parser.add_argument(
        "--port",
        type=int,
        help="HTTP port on 127.0.0.1 (default: a free one); keep it to reuse an earlier index",
    )
    args = parser.parse_args(argv)
    missing = orthanc_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    args.folder.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    files = [
        p for given in args.upload for p in ([given] if given.is_file() else given.rglob("*.dcm"))
    ]
    server = OrthancServer(args.folder, port=args.port)
    try:
        server.start()
    except (RuntimeError, TimeoutError) as exc:  # e.g. the port is taken
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        for path in sorted(files):
            server.upload(path)
        print(
            f"Orthanc up ({len(files)} files uploaded, storage {args.folder}): "
            f"--dicomweb_url {server.dicomweb_url}\nCtrl-C stops it.",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
