"""Local engine clusters for the Beam jobs: Dask, Flink and Spark; fetch, start, stop.

`python -m engines` (and `make fetch-flink`, `make cluster-flink`, ...),
`python -m engines.dask_cluster` (`make cluster-dask`), the benchmarks and the
test fixtures share this one copy of the launch logic. Every server binds to
127.0.0.1 on ports chosen free at start.
"""
