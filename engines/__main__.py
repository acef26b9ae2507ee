"""Fetch or start a local Flink or Spark cluster.

python -m engines fetch flink|spark   # distribution + Beam's job server jar
python -m engines start flink|spark   # cluster + worker pool, until Ctrl-C
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
from pathlib import Path

from engines import session, tools


def _fetch(engine: str) -> int:
    home = tools.fetch_distribution(engine)
    print(f"{engine} distribution: {home}")
    try:
        print(f"Beam's {engine} job server: {tools.fetch_job_server(engine)}")
    except tools.MissingArtifact as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _start(engine: str, run_dir: Path) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with session.running(engine, run_dir) as running:
        missing = tools.missing_job_server(engine)
        if missing:
            print(f"warning: {missing} before submitting")
        flags = " \\\n    ".join(running.runner_args())
        print(
            f"{engine} cluster up at {running.master} (logs in {run_dir / 'logs'}).\n"
            "Submit with:\n\n"
            f".venv/bin/xray-preprocess --metadata ARCHIVE/metadata.csv --output_dir OUT \\\n"
            f"    {flags}\n\nCtrl-C stops it.",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m engines", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("fetch", "start"))
    parser.add_argument("engine", choices=session.ENGINES)
    parser.add_argument("--run_dir", type=Path, help="configs and logs (default: a new temp dir)")
    args = parser.parse_args(argv)
    try:
        if args.action == "fetch":
            return _fetch(args.engine)
        run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix=f"xray-{args.engine}-"))
        return _start(args.engine, run_dir)
    except tools.MissingArtifact as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
