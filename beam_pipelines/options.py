"""Beam pipeline options shared by the jobs: the documented default runner."""

from __future__ import annotations

import os

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions


def usable_cores() -> int:
    """Cores this process may run on (affinity and cgroup-limited), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    """Options for the remaining (Beam) flags, with the local default filled in.

    With no ``--runner``: the FnApiRunner in multi-processing mode with one
    worker per usable core. Not the DirectRunner: in Beam 2.77 it first tries
    to download the Prism runner, which fails offline and, online, ignores
    the multi-processing flags. ``--runner=DaskRunner`` is accepted as a
    short name.
    """
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    if standard.runner == "DaskRunner":
        standard.runner = "apache_beam.runners.dask.dask_runner.DaskRunner"
    if standard.runner is None:
        standard.runner = "FnApiRunner"
        direct = options.view_as(DirectOptions)
        given = " ".join(beam_args)
        if "--direct_running_mode" not in given:
            direct.direct_running_mode = "multi_processing"
        if "--direct_num_workers" not in given:
            # Not 0: Beam turns 0 into cpu_count(), which ignores CPU limits.
            direct.direct_num_workers = usable_cores()
    return options
