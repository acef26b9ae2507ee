"""Fixtures for beam_pipelines tests: paths to the shared real data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DICOM_CORPUS = SHARED_DATA / "dicom_corpus"

requires_corpus = pytest.mark.skipif(
    not (DICOM_CORPUS / "manifest.csv").exists(),
    reason="real DICOM corpus not found at ../shared/data/dicom_corpus",
)


def output_files(root: Path) -> dict[str, bytes]:
    """Every file below root, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service exited early with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


@pytest.fixture
def service() -> Iterator:
    started: list[subprocess.Popen] = []

    def start(module: str, *args: str) -> int:
        port = _free_port()
        env = dict(os.environ)
        # EXTERNAL workers are started as the first `python` on PATH: ours.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        command = [sys.executable, "-m", module, *(a.format(port=port) for a in args)]
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        started.append(process)
        _wait_for_port(port, process)
        return port

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
