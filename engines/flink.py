"""A Flink session cluster on 127.0.0.1: one JobManager and one TaskManager process.

Started the way Flink's own `jobmanager.sh` / `taskmanager.sh` start them
(the JVM and memory flags come from Flink's BashJavaUtils), but as direct
`java` children so the caller holds their process ids.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from engines import procs, tools

_LOG4J = """\
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = File
appender.file.name = File
appender.file.type = FILE
appender.file.fileName = ${sys:log.file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = %d{HH:mm:ss,SSS} %-5p %c{1} - %m%n
"""


@dataclass(frozen=True)
class FlinkCluster:
    """Where a started cluster answers."""

    rest_port: int
    slots: int

    @property
    def master(self) -> str:
        """The `--flink_master` value (the JobManager's REST endpoint)."""
        return f"127.0.0.1:{self.rest_port}"

    @property
    def status_url(self) -> str:
        """The JobManager's cluster overview (JSON)."""
        return f"http://{self.master}/overview"


def _config(slots: int) -> dict:
    loopback = "127.0.0.1"
    rpc, tm_rpc, tm_data, rest, blob = procs.free_ports(5)
    return {
        "jobmanager": {
            "bind-host": loopback,
            "rpc": {"address": loopback, "port": rpc},
            "memory": {"process": {"size": "1024m"}},
        },
        "taskmanager": {
            "bind-host": loopback,
            "host": loopback,
            "numberOfTaskSlots": slots,
            "rpc": {"port": tm_rpc},
            "data": {"port": tm_data},
            # Beam's SDK workers run outside the TaskManager (EXTERNAL pool),
            # so the JVM itself needs little.
            "memory": {"process": {"size": "1536m"}},
        },
        "rest": {"address": loopback, "bind-address": loopback, "port": rest},
        "blob": {"server": {"port": str(blob)}},
        "parallelism": {"default": slots},
    }


def java_options(home: Path) -> list[str]:
    """The `--add-opens` flags Flink's default configuration gives every JVM (Java 17)."""
    (dist,) = (home / "lib").glob("flink-dist-*.jar")
    with zipfile.ZipFile(dist) as jar:
        defaults = yaml.safe_load(jar.read("config.yaml"))
    return str(defaults["env"]["java"]["opts"]["all"]).split()


def _resource_params(java: str, home: Path, conf: Path, which: str) -> tuple[list[str], list[str]]:
    """JVM flags and dynamic properties for the JobManager or TaskManager (BashJavaUtils)."""
    import subprocess

    result = subprocess.run(
        [java, "-cp", f"{home / 'bin' / 'bash-java-utils.jar'}:{home / 'lib' / '*'}"]
        + ["org.apache.flink.runtime.util.bash.BashJavaUtils", which, "--configDir", str(conf)],
        capture_output=True,
        text=True,
        check=True,
    )
    prefix = "BASH_JAVA_UTILS_EXEC_RESULT:"
    jvm, dynamic = [
        line[len(prefix) :].split()
        for line in result.stdout.splitlines()
        if line.startswith(prefix)
    ]
    return jvm, dynamic


def start(run_dir: Path, processes: procs.Processes, slots: int = 2) -> FlinkCluster:
    """Start the JobManager and a TaskManager; return once the TaskManager has registered.

    Raises:
        tools.MissingArtifact: no Java or no Flink distribution (`make fetch-flink`).
    """
    java = tools.require_java()
    home = tools.require_home("flink")
    conf = run_dir / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    config = _config(slots)
    (conf / "config.yaml").write_text(yaml.safe_dump(config))
    (conf / "log4j.properties").write_text(_LOG4J)
    opts = java_options(home)
    for name, which, main in (
        (
            "jobmanager",
            "GET_JM_RESOURCE_PARAMS",
            "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint",
        ),
        (
            "taskmanager",
            "GET_TM_RESOURCE_PARAMS",
            "org.apache.flink.runtime.taskexecutor.TaskManagerRunner",
        ),
    ):
        jvm, dynamic = _resource_params(java, home, conf, which)
        processes.start(
            name,
            [java, *opts, *jvm, f"-Dlog.file={processes.log_dir / (name + '.log')}"]
            + [f"-Dlog4j.configurationFile=file:{conf / 'log4j.properties'}"]
            + ["-cp", str(home / "lib" / "*"), main, "--configDir", str(conf), *dynamic],
        )
    cluster = FlinkCluster(rest_port=config["rest"]["port"], slots=slots)

    def registered() -> bool:
        overview = procs.get_json(cluster.status_url)
        return overview is not None and overview["slots-total"] >= slots

    processes.wait_until(registered, "the Flink TaskManager registered")
    return cluster
