"""One local cluster per engine for the whole test run, started on free loopback ports.

Where Java or an engine's distribution is missing, the tests that need it skip
and say which make target fetches it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engines import session, tools


def _engine(name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[session.Engine]:
    try:
        tools.require_java()
        tools.require_home(name)
    except tools.MissingArtifact as missing:
        pytest.skip(str(missing))
    with session.running(name, tmp_path_factory.mktemp(name)) as engine:
        yield engine


@pytest.fixture(scope="session")
def flink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[session.Engine]:
    """A Flink session cluster (JobManager + TaskManager) and a worker pool."""
    yield from _engine("flink", tmp_path_factory)


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[session.Engine]:
    """A Spark standalone cluster (master + worker) and a worker pool."""
    yield from _engine("spark", tmp_path_factory)
