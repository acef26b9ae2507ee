"""The local clusters come up on loopback, register their workers and run a job.

The job (tests/engines/jobs/*.java, compiled here) sums 2 * (1..N) on the
cluster's TaskManager slots or Spark executors: proof that the cluster runs
work, not just that its servers answer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from engines import flink as flink_engine
from engines import procs, session, tools
from engines import spark as spark_engine

JOBS = Path(__file__).parent / "jobs"
N = 1000

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


def _job_jar(name: str, classpath: str, tmp_path: Path) -> Path:
    """tests/engines/jobs/NAME.java compiled against the engine's jars, as a jar."""
    if shutil.which("javac") is None or shutil.which("jar") is None:
        pytest.skip("javac and jar (a JDK) are needed to build the test job")
    classes = tmp_path / "classes"
    subprocess.run(
        ["javac", "-d", str(classes), "-cp", classpath, str(JOBS / f"{name}.java")], check=True
    )
    jar = tmp_path / f"{name}.jar"
    subprocess.run(["jar", "cf", str(jar), "-C", str(classes), "."], check=True)
    return jar


def _run_job(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_flink_cluster_runs_a_job(flink: session.Engine, tmp_path: Path) -> None:
    overview = procs.get_json(flink.status_url)
    assert overview["flink-version"] == tools.FLINK_VERSION
    assert overview["taskmanagers"] == 1 and overview["slots-total"] == 2
    _assert_loopback_only(flink)

    home = tools.home("flink")
    lib = str(home / "lib" / "*")
    jar = _job_jar("FlinkSum", lib, tmp_path)
    host, port = flink.master.split(":")
    output = _run_job(
        ["java", *flink_engine.java_options(home), "-cp", f"{lib}:{jar}", "FlinkSum"]
        + [host, port, str(jar), str(N)]
    )
    assert f"sum={N * (N + 1)}" in output
    assert procs.get_json(flink.status_url)["jobs-finished"] >= 1


def test_spark_cluster_runs_a_job(spark: session.Engine, tmp_path: Path) -> None:
    state = procs.get_json(spark.status_url)
    assert state["url"] == spark.master and state["status"] == "ALIVE"
    assert state["aliveworkers"] == 1 and state["cores"] == 2
    _assert_loopback_only(spark)

    home = tools.home("spark")
    jars = str(home / "jars" / "*")
    jar = _job_jar("SparkSum", jars, tmp_path)
    output = _run_job(
        ["java", *spark_engine.java_options(home), "-cp", f"{jars}:{jar}", "SparkSum"]
        + [spark.master, str(jar), str(N)]
    )
    assert f"sum={N * (N + 1)}" in output
    completed = procs.get_json(spark.status_url)["completedapps"]
    assert [app["name"] for app in completed] == ["SparkSum"]
