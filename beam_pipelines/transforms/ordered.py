"""Text files in a global order, written in ranges so no worker holds them whole.

:class:`WriteOrdered` sorts a collection of lines by a key: a sample of the
keys chooses range boundaries (one range per :data:`LINES_PER_RANGE` lines),
each range is sorted and written as a part file, and
:func:`concatenate_parts` (on the driver, after the run) streams the parts
in range order into the file, after its header. The sample may
differ between runs; the file does not (a range split anywhere concatenates
to the same sorted lines). :class:`WriteCounts` writes a job's counts for
the driver to read.
"""

from __future__ import annotations

import bisect
import glob
import json
from collections.abc import Iterable
from typing import Any

import apache_beam as beam

from beam_pipelines.storage.files import atomic_create, open_stored, write_text

#: Lines a range holds, about: a worker sorts one range in memory.
LINES_PER_RANGE = 100_000
#: Keys sampled to place the boundaries (so at most this many ranges).
SAMPLE = 8_192
_CHUNK = 1 << 20


def part_pattern(path: str) -> str:
    """Glob of the part files :class:`WriteOrdered` writes for ``path``."""
    return f"{glob.escape(path)}.part-*"


class WriteOrdered(beam.PTransform):
    """Writes (key, line) pairs as sorted part files of ``path`` (``path.part-NNNNN``).

    Lines with equal keys are ordered by their text. Yields the parts' paths;
    the job concatenates them (:func:`concatenate_parts`) once the run is over,
    so a retried or recomputed range only rewrites its own part.
    """

    def __init__(self, path: str, lines_per_range: int = LINES_PER_RANGE) -> None:
        super().__init__()
        self._path, self._per_range = path, max(1, lines_per_range)

    def expand(self, lines: beam.PCollection) -> beam.PCollection:
        path, per_range = self._path, self._per_range
        keys = lines | "Keys" >> beam.Map(lambda pair: pair[0])
        count = keys | "Count" >> beam.combiners.Count.Globally()
        boundaries = (
            keys
            | "Sample" >> beam.combiners.Sample.FixedSizeGlobally(SAMPLE)
            | "Boundaries"
            >> beam.Map(
                lambda sample, n: _boundaries(sample, -(-n // per_range)),
                beam.pvalue.AsSingleton(count),
            )
        )

        def write_range(element: tuple[int, Iterable[tuple[Any, str]]]) -> str:
            number, pairs = element
            ordered = sorted(pairs)
            return write_text(f"{path}.part-{number:05d}", "".join(line for _, line in ordered))

        return (
            lines
            | "ToRange"
            >> beam.Map(
                lambda pair, bounds: (bisect.bisect_right(bounds, pair[0]), pair),
                beam.pvalue.AsSingleton(boundaries),
            )
            | "GroupByRange" >> beam.GroupByKey()
            | "WriteRanges" >> beam.Map(write_range)
        )


def _boundaries(sample: list[Any], ranges: int) -> list[Any]:
    """At most ``ranges - 1`` increasing keys splitting the sample into equal ranges."""
    if ranges <= 1:
        return []
    keys = sorted(sample)
    step = max(1, len(keys) // ranges)
    return sorted(set(keys[step::step]))[: ranges - 1]


def concatenate_parts(path: str, header: str, parts: list[str]) -> None:
    """Writes ``path`` atomically: ``header``, then the parts in name order, streamed."""
    with atomic_create(path) as out:
        out.write(header.encode("utf-8"))
        for part in sorted(parts):
            with open_stored(part) as handle:
                while chunk := handle.read(_CHUNK):
                    out.write(chunk)


def parts_of(path: str) -> list[str]:
    """The part files written for ``path`` (local or remote)."""
    from apache_beam.io.filesystems import FileSystems

    return [m.path for m in FileSystems.match([part_pattern(path)])[0].metadata_list]


class WriteCounts(beam.PTransform):
    """Count names (one element per counted thing) -> ``path``: a JSON ``{name: count}``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def expand(self, names: beam.PCollection) -> beam.PCollection:
        path = self._path

        def write(counts: dict[str, int]) -> str:
            return write_text(path, json.dumps(dict(sorted(counts.items()))))

        return (
            names
            | "Count" >> beam.combiners.Count.PerElement()
            | "ToDict" >> beam.combiners.ToDict()
            | "Write" >> beam.Map(write)
        )


def read_counts(path: str) -> dict[str, int]:
    """What :class:`WriteCounts` wrote."""
    with open_stored(path) as handle:
        return {str(k): int(v) for k, v in json.loads(handle.read()).items()}
