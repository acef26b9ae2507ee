"""A Spark standalone cluster on 127.0.0.1: one master and one worker process.

The `java` command lines are the ones `spark-class` runs for
`org.apache.spark.deploy.master.Master` and `...worker.Worker` (built by
Spark's own launcher, Java 17 module flags included), started directly so the
caller holds their process ids.
"""

from __future__ import annotations

import os
import subprocess
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


def _environment(home: Path, conf: Path) -> dict[str, str]:
    env = dict(os.environ)
    # SPARK_LOCAL_IP pins every socket the daemons and their executors open;
    # the launcher needs the Scala version of a distribution without a build.
    env.update(
        SPARK_HOME=str(home),
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_CONF_DIR=str(conf),
        SPARK_SCALA_VERSION="2.12",
    )
    return env


def spark_class(java: str, home: Path, env: dict[str, str], main: str, *args: str) -> list[str]:
    """The command `spark-class MAIN ARGS` would run (Spark's launcher builds it)."""
    built = subprocess.run(
        [java, "-cp", str(home / "jars" / "*"), "org.apache.spark.launcher.Main", main, *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return [token.strip() for token in built.stdout.split("\0") if token.strip()]


def java_options(home: Path) -> list[str]:
    """JVM flags Spark gives a driver on this Java (the `--add-opens` list on 17)."""
    java = tools.require_java()
    command = spark_class(
        java, home, _environment(home, home / "conf"), "org.apache.spark.deploy.SparkSubmit"
    )
    main = command.index("org.apache.spark.deploy.SparkSubmit")
    return [flag for flag in command[3:main] if not flag.startswith("-Xm")]


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
    env = _environment(home, conf)
    master_port, ui_port, worker_port, worker_ui_port = procs.free_ports(4)
    cluster = SparkCluster(master_port=master_port, ui_port=ui_port, cores=cores)
    master = ["--host", "127.0.0.1", "--port", str(master_port), "--webui-port", str(ui_port)]
    worker = [cluster.master, "--host", "127.0.0.1", "--port", str(worker_port)]
    worker += ["--webui-port", str(worker_ui_port), "--cores", str(cores), "--memory", memory]
    worker += ["--work-dir", str(run_dir / "work")]
    for name, main, args in (
        ("master", "org.apache.spark.deploy.master.Master", master),
        ("worker", "org.apache.spark.deploy.worker.Worker", worker),
    ):
        processes.start(name, spark_class(java, home, env, main, *args), env=env)

    def registered() -> bool:
        state = procs.get_json(cluster.status_url)
        return state is not None and state["aliveworkers"] >= 1

    processes.wait_until(registered, "the Spark worker registered")
    return cluster
