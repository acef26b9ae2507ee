"""The preprocessing job's composites: valid rows -> split, decoded, sharded records.

:class:`Preprocess` assigns patients to splits, decodes and stages every
row's record, writes the shards and splits.csv; :class:`WriteManifest`
writes the rejects and, last, manifest.json (its side inputs are the other
outputs' paths, so a manifest means a complete output).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam import pvalue

from beam_pipelines import dicom
from beam_pipelines.contracts import manifest, records, splits
from beam_pipelines.privacy import Pseudonymizer
from beam_pipelines.storage.files import write_json, write_text
from beam_pipelines.transforms.decode import DecodeAndStageFn
from beam_pipelines.transforms.outcomes import CountByReason, SplitOutcomes, WriteRejects
from beam_pipelines.transforms.rows import ValidRow
from beam_pipelines.transforms.shards import WriteShards


def patient_rows(row: ValidRow) -> tuple[str, tuple[bool, int]]:
    """(PatientID, (abnormal, 1)): what a row adds to its patient's summary."""
    return row.patient_id, (bool(row.abnormal), 1)


def any_abnormal_and_rows(values: Iterable[tuple[bool, int]]) -> tuple[bool, int]:
    """Combines (abnormal, rows) pairs of one patient; associative, so partials combine too."""
    abnormal, rows = False, 0
    for value_abnormal, value_rows in values:
        abnormal, rows = abnormal or value_abnormal, rows + value_rows
    return abnormal, rows


def plan_splits(
    patients: Iterable[tuple[str, tuple[bool, int]]],
    ratios: tuple[float, float, float],
    seed: int,
    pinned: dict[str, str],
) -> dict[str, dict[str, Any]]:
    """PatientID -> split, and the rows each split gets, from one summary per patient."""
    patients = list(patients)
    assignment = splits.assign_splits(
        ((patient, abnormal) for patient, (abnormal, _) in patients), ratios, seed, pinned
    )
    rows: dict[str, int] = {}
    for patient, (_, count) in patients:
        rows[assignment[patient]] = rows.get(assignment[patient], 0) + count
    return {"assignment": assignment, "rows": rows}


class AssignSplits(beam.PTransform):
    """Computes PatientID -> split, and the rows each split gets, from one record per patient.

    Works on the validated rows, before decoding, so the assignment is ready
    when images are decoded; a patient whose every image later fails to
    decode still has a place in splits.csv. Yields one dict:
    ``{"assignment": {PatientID: split}, "rows": {split: rows}}`` (the row
    counts fix each split's shard count before any image is decoded).
    """

    def __init__(self, ratios: tuple[float, float, float], seed: int, pinned: dict[str, str]):
        super().__init__()
        self._ratios, self._seed, self._pinned = ratios, seed, pinned

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        ratios, seed, pinned = self._ratios, self._seed, self._pinned
        return (
            records
            | "PatientRows" >> beam.Map(patient_rows)
            | "PerPatient" >> beam.CombinePerKey(any_abnormal_and_rows)
            | "AllPatients" >> beam.combiners.ToList()
            | "Assign" >> beam.Map(plan_splits, ratios, seed, pinned)
        )


class KeptStats(beam.CombineFn):
    """Kept records per split x label, and mean/std of the stored training pixels.

    Pixel sums are exact integers over the 16-bit stored values, so the
    result does not depend on how a runner splits and merges the work.
    """

    def create_accumulator(self) -> tuple[dict[str, int], int, int, int]:
        return {}, 0, 0, 0

    def add_input(
        self, acc: tuple[dict[str, int], int, int, int], summary: dict[str, Any]
    ) -> tuple[dict[str, int], int, int, int]:
        counts, total, squares, pixels = acc
        key = manifest.count_key(summary["split"], summary["label"])
        counts[key] = counts.get(key, 0) + 1
        add_total, add_squares, add_pixels = summary["pixel_sums"]
        return counts, total + add_total, squares + add_squares, pixels + add_pixels

    def merge_accumulators(
        self, accs: Iterable[tuple[dict[str, int], int, int, int]]
    ) -> tuple[dict[str, int], int, int, int]:
        merged: dict[str, int] = {}
        total = squares = pixels = 0
        for counts, add_total, add_squares, add_pixels in accs:
            for key, count in counts.items():
                merged[key] = merged.get(key, 0) + count
            total, squares, pixels = total + add_total, squares + add_squares, pixels + add_pixels
        return merged, total, squares, pixels

    def extract_output(self, acc: tuple[dict[str, int], int, int, int]) -> dict[str, Any]:
        counts, total, squares, pixels = acc
        if pixels == 0:
            return {"counts": counts, "pixels": {"mean": None, "std": None, "pixels": 0}}
        scale = float(records.IMAGE_MAX)
        mean = total / pixels
        variance = max(squares / pixels - mean * mean, 0.0)
        stats = {"mean": mean / scale, "std": variance**0.5 / scale, "pixels": pixels}
        return {"counts": counts, "pixels": stats}


class Preprocess(beam.PTransform):
    """Unique valid rows -> shards and splits.csv under ``out``.

    Returns a dict of PCollections: ``shards`` (paths), ``splits`` (the
    splits.csv path), ``kept_stats`` (one :class:`KeptStats` result) and
    ``rejects`` (rows whose DICOM could not be decoded).
    """

    def __init__(
        self,
        out: str,
        ratios: tuple[float, float, float],
        seed: int,
        pinned: dict[str, str],
        num_shards: int,
        decoding: dicom.DecodeOptions,
        resize_policy: dicom.ResizePolicy,
        pseudonymizer: Pseudonymizer | None,
    ) -> None:
        super().__init__()
        self._out, self._ratios, self._seed, self._pinned = out, ratios, seed, pinned
        self._num_shards, self._pseudonymizer = num_shards, pseudonymizer
        self._decoding, self._resize_policy = decoding, resize_policy

    def expand(self, unique: beam.PCollection) -> dict[str, beam.PCollection]:
        out = self._out
        plan = unique | "AssignSplits" >> AssignSplits(self._ratios, self._seed, self._pinned)
        assignment = plan | "Assignment" >> beam.Map(lambda p: p["assignment"])
        sizes = plan | "RowsPerSplit" >> beam.Map(lambda p: p["rows"])
        decode = DecodeAndStageFn(
            self._decoding,
            self._resize_policy,
            staging_dir(out),
            self._num_shards,
            self._pseudonymizer,
        )
        summaries, undecodable = (
            unique
            | "DecodeDicom"
            >> beam.ParDo(decode, pvalue.AsSingleton(assignment), pvalue.AsSingleton(sizes))
            | "RouteDecoded" >> SplitOutcomes()
        )
        return {
            "shards": summaries
            | "WriteShards" >> WriteShards(out, self._num_shards, sizes, self._seed),
            "splits": assignment
            | "WriteSplits"
            >> beam.Map(lambda a: write_text(splits_file(out), splits.format_splits_csv(a))),
            "kept_stats": summaries | "KeptStats" >> beam.CombineGlobally(KeptStats()),
            "rejects": undecodable,
        }


def staging_dir(out: str) -> str:
    """Where the decode stage stages compressed records (removed after the run)."""
    return f"{out}/.staging"


def rejects_file(out: str) -> str:
    return f"{out}/rejects/rejects.jsonl"


def splits_file(out: str) -> str:
    return f"{out}/splits.csv"


def write_manifest(
    input_rows: int,
    out: str,
    settings: dict[str, Any],
    kept_stats: dict[str, Any],
    rejected: dict[str, int],
    shards: list[str],
    rejects: str,
    splits_csv: str,
) -> str:
    """Writes ``<out>/manifest.json`` (last: it marks the output complete); returns its path."""
    files = {"shards": shards, "rejects": rejects, "splits": splits_csv}
    document = manifest.build(input_rows, settings, out, kept_stats, rejected, files)
    return write_json(f"{out}/{manifest.FILE}", document)


class WriteManifest(beam.PTransform):
    """Every row read -> the rejects file, then manifest.json (its path is the output).

    Args:
        rejects: every reject record of the run.
        written: what :class:`Preprocess` returned.
        settings: the run's options, recorded in the manifest.
    """

    def __init__(
        self,
        out: str,
        rejects: beam.PCollection,
        written: dict[str, beam.PCollection],
        settings: dict[str, Any],
    ) -> None:
        super().__init__()
        self._out, self._rejects, self._written, self._settings = out, rejects, written, settings

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        out, written, settings = self._out, self._written, self._settings
        rejects_path = self._rejects | "WriteRejects" >> WriteRejects(rejects_file(out))
        reject_counts = self._rejects | "CountRejects" >> CountByReason()

        return (
            rows
            | "CountInput" >> beam.combiners.Count.Globally()
            | "WriteManifest"
            >> beam.Map(
                write_manifest,
                out,
                settings,
                pvalue.AsSingleton(written["kept_stats"]),
                pvalue.AsSingleton(reject_counts),
                pvalue.AsList(written["shards"]),
                pvalue.AsSingleton(rejects_path),
                pvalue.AsSingleton(written["splits"]),
            )
        )
