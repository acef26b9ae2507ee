"""The local clusters come up on loopback with their workers registered."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engines import procs, session, tools

pytestmark = pytest.mark.slow


def _listening_addresses(pids: set[int]) -> set[str]:
    """Local addresses of the TCP sockets these processes listen on (Linux /proc)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addresses.add(fields[1].rsplit(":", 1)[0])
    return addresses


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::ffff:127.0.0.1


def _assert_loopback_only(engine: session.Engine) -> None:
    addresses = _listening_addresses(engine.pids)
    assert addresses, "no listening socket found"
    assert addresses <= LOOPBACK, f"listening beyond loopback: {addresses - LOOPBACK}"


def test_flink_cluster(flink: session.Engine) -> None:
    overview = procs.get_json(flink.status_url)
    assert overview["flink-version"] == tools.FLINK_VERSION
    assert overview["taskmanagers"] == 1 and overview["slots-total"] == 2
    _assert_loopback_only(flink)


def test_spark_cluster(spark: session.Engine) -> None:
    state = procs.get_json(spark.status_url)
    assert state["url"] == spark.master and state["status"] == "ALIVE"
    assert state["aliveworkers"] == 1 and state["cores"] == 2
    _assert_loopback_only(spark)
