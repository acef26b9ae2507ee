"""malloc_tuning: freed image buffers stay in the process (fewer page faults)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from beam_pipelines import malloc_tuning

# A 40 MB buffer (a large radiograph's float image) allocated and freed
# again and again. glibc's own mmap threshold stops growing at 32 MB, so by
# default every allocation is a fresh mmap whose pages all fault in (10,241
# faults of 4 KB measured here); with the tuned thresholds the block comes
# from the heap and stays there (0 faults). Counted with bytearrays (malloc,
# then a memset that touches every page; no huge-page advice, unlike numpy),
# so the count depends neither on transparent huge pages nor on the load of
# other processes (an earlier version of this test, with numpy arrays on a
# thread, was flaky under load).
_WORKLOAD = """
import resource, sys
from beam_pipelines import malloc_tuning
if sys.argv[1] == "tuned":
    assert malloc_tuning.keep_freed_buffers()
block = bytearray(40 << 20)
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    block = bytearray(40 << 20)
    del block
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_allocation(mode: str) -> float:
    result = subprocess.run(
        [sys.executable, "-c", _WORKLOAD, mode], capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip())


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_tuned_process_reuses_freed_buffers() -> None:
    default, tuned = _faults_per_allocation("default"), _faults_per_allocation("tuned")
    assert default > 5000, default  # every 40 MB allocation faulted its pages in
    assert tuned < default / 20, (default, tuned)


def test_second_call_is_free_and_consistent() -> None:
    first = malloc_tuning.keep_freed_buffers()
    assert malloc_tuning.keep_freed_buffers() == first
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first
