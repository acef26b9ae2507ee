"""Where the engines' downloads live, and how they are fetched.

The Flink distribution comes from the `apache-flink-libraries` source package
(the distribution inside PyFlink) and Spark's from `pyspark`, both on PyPI;
only their `lib`/`jars` folders are unpacked, so neither's Python pins (an
older Beam in PyFlink's case) ever meet ours. Beam's job servers are Maven
artifacts fetched with `mvn dependency:get` into the local Maven repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

FLINK_VERSION = "1.20.3"
SPARK_VERSION = "3.5.9"
# The Flink minor Beam publishes a job server for (`--flink_version`).
FLINK_MINOR = "1.20"

_PACKAGES = {
    "flink": (f"apache-flink-libraries=={FLINK_VERSION}", ("deps/lib/", "deps/bin/")),
    "spark": (f"pyspark=={SPARK_VERSION}", ("deps/jars/",)),
}
# Flink's lib/ holds connectors and the table planner too: Beam needs none.
_FLINK_SKIP = (
    "flink-table",
    "flink-cep",
    "flink-scala",
    "flink-connector",
    "flink-csv",
    "flink-json",
)


class MissingArtifact(FileNotFoundError):
    """A distribution or job server jar that a make target has to fetch first."""


def tools_dir() -> Path:
    """Folder for the distributions: $XRAY_TOOLS_DIR, else `.tools/` in the checkout."""
    return Path(os.environ.get("XRAY_TOOLS_DIR") or Path(__file__).resolve().parents[1] / ".tools")


def home(engine: str) -> Path:
    """The unpacked distribution of `engine` ("flink" or "spark")."""
    version = FLINK_VERSION if engine == "flink" else SPARK_VERSION
    return tools_dir() / f"{engine}-{version}"


def job_server_artifact(engine: str) -> str:
    """Maven coordinates of Beam's job server for `engine`, at the installed Beam's version."""
    from importlib.metadata import version

    beam = version("apache-beam")

    name = f"flink-{FLINK_MINOR}" if engine == "flink" else "spark-3"
    return f"org.apache.beam:beam-runners-{name}-job-server:{beam}"


def job_server_jar(engine: str) -> Path:
    """Where `mvn dependency:get` puts the job server jar (the local Maven repository)."""
    group, artifact, version = job_server_artifact(engine).split(":")
    repository = Path(os.environ.get("MAVEN_REPOSITORY") or Path.home() / ".m2" / "repository")
    return repository.joinpath(*group.split("."), artifact, version, f"{artifact}-{version}.jar")


def require_java() -> str:
    """The `java` launcher, or MissingArtifact saying Java 17 is needed."""
    java = shutil.which("java")
    if java is None:
        raise MissingArtifact("java not found: the Flink and Spark clusters need a Java 17 runtime")
    return java


def require_home(engine: str) -> Path:
    """The distribution folder, or MissingArtifact naming the make target that fetches it."""
    root = home(engine)
    if not (root / ".complete").exists():
        raise MissingArtifact(
            f"{engine} distribution not found at {root}: run `make fetch-{engine}`"
        )
    return root


def missing_job_server(engine: str) -> str | None:
    """Why the job server jar cannot be used (naming the make target), or None."""
    jar = job_server_jar(engine)
    if jar.exists():
        return None
    return (
        f"Beam's {engine} job server {job_server_artifact(engine)} not found at {jar}: "
        f"run `make fetch-{engine}`"
    )


def fetch_distribution(engine: str) -> Path:
    """Download the engine's PyPI package and unpack its Java parts into home(engine)."""
    root = home(engine)
    if (root / ".complete").exists():
        return root
    requirement, wanted = _PACKAGES[engine]
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
            ]
            + ["--dest", scratch, requirement],
            check=True,
        )
        (archive,) = Path(scratch).glob("*.tar.gz")
        unpacked = Path(scratch) / "home"
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                inner = member.name.split("/", 1)[-1]
                if not inner.startswith(wanted) or Path(inner).name.startswith(_FLINK_SKIP):
                    continue
                member.name = inner.removeprefix("deps/")
                tar.extract(member, unpacked, filter="data")
        # Spark's launcher takes a RELEASE file as the sign of a distribution.
        (unpacked / "RELEASE").write_text(requirement + "\n")
        (unpacked / ".complete").write_text(requirement + "\n")
        if root.exists():
            shutil.rmtree(root)
        unpacked.rename(root)
    return root


def fetch_job_server(engine: str) -> Path:
    """`mvn dependency:get` Beam's job server jar into the local Maven repository."""
    jar = job_server_jar(engine)
    if jar.exists():
        return jar
    if shutil.which("mvn") is None:
        raise MissingArtifact("mvn not found: Maven fetches Beam's job server jars")
    result = subprocess.run(
        # -U: try the network again even where an earlier miss was cached.
        ["mvn", "--batch-mode", "--quiet", "-U", "-Dstyle.color=never", "dependency:get"]
        + ["-Dtransitive=false"]
        + [f"-Dartifact={job_server_artifact(engine)}"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not jar.exists():
        errors = [
            line.split("[ERROR]", 1)[1].strip()
            for line in result.stdout.splitlines()
            if "[ERROR]" in line
        ]
        reason = next((e for e in errors if e), "no jar written")
        reason = reason.split("standalone-pom: ", 1)[-1].split(" during a previous")[0]
        raise MissingArtifact(f"mvn could not fetch {job_server_artifact(engine)}: {reason}")
    return jar
