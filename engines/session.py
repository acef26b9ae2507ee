"""One local engine for trying or testing jobs: cluster, worker pool and the runner flags."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engines import flink, procs, spark, tools

ENGINES = ("flink", "spark")


@dataclass(frozen=True)
class Engine:
    """A running engine: its master address and the flags that submit a job to it."""

    name: str
    master: str
    status_url: str
    worker_pool: str
    job_server_jar: Path
    job_server_jvm: tuple[str, ...]
    pids: frozenset[int]

    def runner_args(self) -> list[str]:
        """The flags for xray-preprocess / xray-score (the same on a real cluster)."""
        if self.name == "flink":
            runner = [
                "--runner=FlinkRunner",
                f"--flink_master={self.master}",
                f"--flink_version={tools.FLINK_MINOR}",
                f"--flink_job_server_jar={self.job_server_jar}",
            ]
        else:
            runner = [
                "--runner=SparkRunner",
                f"--spark_master_url={self.master}",
                f"--spark_job_server_jar={self.job_server_jar}",
            ]
        # The engine's Java 17 module flags: the job server runs its client (Spark: its driver).
        runner += [f"--job_server_jvm_property={flag}" for flag in self.job_server_jvm]
        return [*runner, "--environment_type=EXTERNAL", f"--environment_config={self.worker_pool}"]


@contextmanager
def running(name: str, run_dir: Path) -> Iterator[Engine]:
    """Start `name`'s cluster and a loopback worker pool; stop both on exit.

    Raises:
        tools.MissingArtifact: Java or the distribution is missing.
    """
    processes = procs.Processes(run_dir / "logs")
    try:
        engine = flink if name == "flink" else spark
        cluster = engine.start(run_dir, processes)
        pool_port = procs.free_port()
        processes.start(
            "worker_pool", [sys.executable, "-m", "engines.worker_pool", f"--port={pool_port}"]
        )
        processes.wait_until(lambda: procs.listening(pool_port), "the worker pool listened")
        yield Engine(
            name,
            cluster.master,
            cluster.status_url,
            f"127.0.0.1:{pool_port}",
            tools.job_server_jar(name),
            tuple(engine.java_options(tools.home(name))),
            frozenset(processes.pids()),
        )
    finally:
        processes.stop()
