"""Local Flink and Spark clusters for Beam's portable runners: fetch, start, stop.

`python -m engines` (and `make fetch-flink`, `make cluster-flink`, ...) and the
test fixtures share this one copy of the launch logic. Every server binds to
127.0.0.1 on ports chosen free at start.
"""
