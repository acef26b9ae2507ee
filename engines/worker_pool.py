"""A Beam worker pool (EXTERNAL environment) bound to 127.0.0.1 only.

Beam's `worker_pool_main` binds every interface; this serves the same
servicer on loopback. Each SDK worker it starts is a subprocess of this
Python, so workers have the project and its codecs installed.

    python -m engines.worker_pool --port 50000
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> None:
    """Serve the worker pool until interrupted."""
    import grpc
    from apache_beam.portability.api import beam_fn_api_pb2_grpc
    from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer
    from apache_beam.utils import thread_pool_executor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    # The servicer starts each SDK worker as the first `python` on PATH: make
    # that this one, which has the project and its codecs.
    os.environ["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"
    server = grpc.server(thread_pool_executor.shared_unbounded_instance())
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(
        BeamFnExternalWorkerPoolServicer(use_process=True), server
    )
    server.start()
    logging.getLogger(__name__).info("worker pool listening on 127.0.0.1:%d", args.port)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(0)


if __name__ == "__main__":
    main()
