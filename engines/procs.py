"""Starting and stopping the server processes of a local cluster."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:  # all held open at once, so no port comes twice
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return free_ports(1)[0]


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def get_json(url: str) -> Any | None:
    """The JSON at url, or None while nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except (OSError, urllib.error.URLError, ValueError):
        return None


class Processes:
    """Server processes started for one cluster, each logging to its own file.

    Stopping ends them in reverse order: a TaskManager or worker goes before
    the master it reports to, so it does not spend the shutdown reconnecting.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: Sequence[str], env: dict[str, str] | None = None) -> None:
        """Start `command` in the background; its output goes to LOG_DIR/name.out."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.out", "wb") as log:
            process = subprocess.Popen(
                list(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                # Its own session: a Ctrl-C meant for the launcher does not
                # reach the servers, which stop() ends in order.
                start_new_session=True,
            )
        self.started.append((name, process))

    def pids(self) -> list[int]:
        """Process ids of the servers started."""
        return [process.pid for _name, process in self.started]

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 120) -> None:
        """Poll `ready` until true; RuntimeError if a process died or time ran out."""
        deadline = time.monotonic() + timeout
        while not ready():
            for name, process in self.started:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with code {process.returncode} before {what}: "
                        f"see {self.log_dir / (name + '.out')}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what} did not happen within {timeout:.0f}s: see {self.log_dir}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """Terminate every process (SIGTERM, then SIGKILL after 20 s)."""
        for _name, process in reversed(self.started):
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.started.clear()
