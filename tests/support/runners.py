"""How tests run pipelines: the in-process runner, and ports of locally started services."""

from __future__ import annotations

import socket
import subprocess
import time

#: Beam's in-process runner, in memory: what every local job run in the tests uses.
LOCAL_RUNNER = ["--runner=FnApiRunner", "--direct_running_mode=in_memory"]


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    """Returns once ``process`` listens on ``port``; raises if it exits or never does."""
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
