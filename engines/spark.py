"""A Spark standalone cluster on 127.0.0.1: one master and one worker process.

The same `java` command lines Spark's `spark-class` builds for
`org.apache.spark.deploy.master.Master` and `...worker.Worker`, run directly
so the caller holds their process ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engines import procs, tools


@dataclass(frozen=True)
class SparkCluster:
    """Where a started cluster answers."""

    master_port: int
    ui_port: int
    cores: int

    @property
    def master(self) -> str:
        """The `--spark_master_url` value."""
        return f"spark://127.0.0.1:{self.master_port}"

    @property
    def status_url(self) -> str:
        """The master's state (JSON from its web UI)."""
        return f"http://127.0.0.1:{self.ui_port}/json/"


def start(
    run_dir: Path, processes: procs.Processes, cores: int = 2, memory: str = "2g"
) -> SparkCluster:
    """Start the master and a worker; return once the worker has registered.

    Raises:
        tools.MissingArtifact: no Java or no Spark distribution (`make fetch-spark`).
    """
    java = tools.require_java()
    home = tools.require_home("spark")
    conf = run_dir / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # SPARK_LOCAL_IP pins every socket the daemons and their executors open.
    env.update(SPARK_HOME=str(home), SPARK_LOCAL_IP="127.0.0.1", SPARK_CONF_DIR=str(conf))
    classpath = ["-cp", f"{conf}/:{home / 'jars' / '*'}", "-Xmx1g"]
    master_port, ui_port, worker_port, worker_ui_port = procs.free_ports(4)
    cluster = SparkCluster(master_port=master_port, ui_port=ui_port, cores=cores)
    processes.start(
        "master",
        [java, *classpath, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1"]
        + ["--port", str(cluster.master_port), "--webui-port", str(cluster.ui_port)],
        env=env,
    )
    processes.start(
        "worker",
        [java, *classpath, "org.apache.spark.deploy.worker.Worker", cluster.master]
        + ["--host", "127.0.0.1", "--port", str(worker_port)]
        + ["--webui-port", str(worker_ui_port), "--cores", str(cores), "--memory", memory]
        + ["--work-dir", str(run_dir / "work")],
        env=env,
    )

    def registered() -> bool:
        state = procs.get_json(cluster.status_url)
        return state is not None and state["aliveworkers"] >= 1

    processes.wait_until(registered, "the Spark worker registered")
    return cluster
