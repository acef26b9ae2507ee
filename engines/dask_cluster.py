"""A local dask.distributed cluster from dask's own CLI: one scheduler, N worker processes.

``python -m engines.dask_cluster`` (``make cluster-dask``) starts it, prints
the flags that submit a job to it and runs until Ctrl-C; the test fixtures and
``benchmarks/dask_wall_time.py`` use :func:`running`. Everything binds to
127.0.0.1 on ports chosen free at start. A real cluster is the same commands
on other hosts (docs/runners.md).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engines import procs


@dataclass(frozen=True)
class DaskCluster:
    """A running cluster: its scheduler address and the flags that submit a job to it."""

    scheduler: str
    dashboard: str
    workers: int
    pids: frozenset[int]

    def runner_args(self) -> list[str]:
        """The flags for xray-preprocess / xray-score (the same on a real cluster)."""
        return ["--runner=DaskRunner", f"--dask_client_address={self.scheduler}"]


def _workers_connected(scheduler: str, expected: int) -> bool:
    from distributed import Client

    try:
        with Client(scheduler, timeout=5) as client:
            return len(client.scheduler_info(n_workers=-1)["workers"]) >= expected
    except (OSError, TimeoutError):
        return False


@contextlib.contextmanager
def running(run_dir: Path, workers: int = 2, threads: int = 1) -> Iterator[DaskCluster]:
    """Start ``dask scheduler`` and ``workers`` ``dask worker`` processes; stop them on exit.

    Each worker is its own process with ``threads`` threads (one DoFn bundle
    per thread at a time). Logs go to RUN_DIR/logs.
    """
    dask = [sys.executable, "-m", "dask"]  # this environment's dask: workers import the project
    processes = procs.Processes(run_dir / "logs")
    port, dashboard = procs.free_ports(2)
    scheduler = f"tcp://127.0.0.1:{port}"
    try:
        processes.start(
            "scheduler",
            [*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port)]
            + ["--dashboard-address", f"127.0.0.1:{dashboard}"],
        )
        processes.wait_until(lambda: procs.listening(port), "the scheduler listened")
        for index in range(workers):
            processes.start(
                f"worker-{index}",
                [*dask, "worker", scheduler, "--host", "127.0.0.1", "--nworkers", "1"]
                + ["--nthreads", str(threads), "--no-dashboard", "--name", f"worker-{index}"]
                + ["--local-directory", str(run_dir / f"worker-{index}")],
            )
        processes.wait_until(
            lambda: _workers_connected(scheduler, workers), f"{workers} workers connected"
        )
        yield DaskCluster(
            scheduler, f"http://127.0.0.1:{dashboard}/status", workers, frozenset(processes.pids())
        )
    finally:
        processes.stop()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: start a cluster, print the submit flags, wait for Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m engines.dask_cluster", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (default 1)")
    parser.add_argument("--run_dir", type=Path, help="logs (default: a new temp dir)")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="xray-dask-"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with running(run_dir, args.workers, args.threads) as cluster:
        flags = " ".join(cluster.runner_args())
        print(
            f"dask cluster up: scheduler {cluster.scheduler}, {cluster.workers} workers, "
            f"dashboard {cluster.dashboard} (logs in {run_dir / 'logs'}).\n"
            "Submit with (absolute paths: the workers run in their own folders):\n\n"
            ".venv/bin/xray-preprocess --metadata /ABS/ARCHIVE/metadata.csv \\\n"
            "    --output_dir /ABS/OUT "
            f"{flags}\n\nCtrl-C stops it.",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
