"""Fixtures for beam_pipelines tests: locally started job services."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.runners import free_port, wait_for_port


@pytest.fixture
def service() -> Iterator:
    """start(module, *args) runs ``python -m module`` on a free port ({port} in args)."""
    started: list[subprocess.Popen] = []

    def start(module: str, *args: str) -> int:
        port = free_port()
        env = dict(os.environ)
        # EXTERNAL workers are started as the first `python` on PATH: ours.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        command = [sys.executable, "-m", module, *(a.format(port=port) for a in args)]
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        started.append(process)
        wait_for_port(port, process)
        return port

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
