"""The predictions contract (trainer and scorer -> analysis).

Parquet, one row per image. This module owns the columns and their types;
writers and readers import it. ``predicted`` is the 0/1 finding at the
model's operating point (null when the model has none); the operating point
itself rides in each file's footer (:mod:`beam_pipelines.contracts.operating_point`).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        pa.field("dicom_path", pa.string(), nullable=False),
        pa.field("patient_id", pa.string()),
        pa.field("study_id", pa.string()),
        pa.field("view_position", pa.string()),
        pa.field("age", pa.int32()),
        pa.field("sex", pa.string()),
        pa.field("split", pa.string()),
        pa.field("label", pa.int8()),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("predicted", pa.int8()),
        pa.field("model_id", pa.string(), nullable=False),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
#: The columns an image brings from its metadata row or record, before scoring.
IMAGE_COLUMNS: tuple[str, ...] = (
    "dicom_path",
    "patient_id",
    "study_id",
    "view_position",
    "age",
    "sex",
    "label",
)
#: The columns the scorer or trainer adds.
SCORING_COLUMNS: tuple[str, ...] = ("split", "score", "predicted", "model_id")


def to_table(
    columns: Mapping[str, Sequence[Any]], operating_point: dict[str, Any] | None = None
) -> pa.Table:
    """Builds a contract table from column lists (missing optional columns become null).

    ``operating_point``, when given, goes into the table's (the file's) footer.

    Raises:
        ValueError: for unknown columns, missing required ones, or ragged lengths.
    """
    unknown = set(columns) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown prediction columns {sorted(unknown)}")
    required = [f.name for f in SCHEMA if not f.nullable]
    missing = [name for name in required if name not in columns]
    if missing:
        raise ValueError(f"prediction columns missing: {missing}")
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"prediction columns have different lengths {sorted(lengths)}")
    rows = lengths.pop() if lengths else 0
    arrays = [
        pa.array(columns[f.name], type=f.type) if f.name in columns else pa.nulls(rows, f.type)
        for f in SCHEMA
    ]
    from beam_pipelines.contracts.operating_point import footer

    return pa.Table.from_arrays(arrays, schema=SCHEMA.with_metadata(footer(operating_point)))


def write(
    path: str, columns: Mapping[str, Sequence[Any]], operating_point: dict[str, Any] | None = None
) -> None:
    """Writes one Parquet file of predictions (with the operating point in its footer)."""
    pq.write_table(to_table(columns, operating_point), path)


def read(
    paths: str | Sequence[str], columns: Sequence[str] | None = None, extra: Sequence[str] = ()
) -> pa.Table:
    """Reads prediction files (a path, a glob's results or a list) as one table.

    Args:
        paths: the files.
        columns: contract columns to read (default all).
        extra: further columns some files carry beyond the contract (e.g. a
            site or scanner column added by a user); read as strings.
    """
    import pyarrow.dataset as ds

    schema = pa.schema([*SCHEMA, *(pa.field(name, pa.string()) for name in extra)])
    dataset = ds.dataset(paths, format="parquet", schema=schema)
    wanted = [*(columns or COLUMNS), *extra] if (columns or extra) else None
    return dataset.to_table(columns=wanted)


def extra_columns(paths: Sequence[str]) -> list[str]:
    """Columns the files carry beyond the contract, from their footers only."""
    import pyarrow.parquet as pq

    names: list[str] = []
    for path in paths:
        for name in pq.read_schema(path).names:
            if name not in COLUMNS and name not in names and not name.startswith("__"):
                names.append(name)
    return names


def file_problem(path: str) -> str | None:
    """Why ``path`` is not a readable predictions file, or None (reads the footer only)."""
    import os

    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if size == 0:
        return "is empty (0 bytes): not a Parquet file (was its writer killed?)"
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as exc:
        return f"is not a readable Parquet file ({exc})"
    missing = [name for name in ("dicom_path", "score") if name not in names]
    if missing:
        return f"is not a predictions file (no {', '.join(missing)} column)"
    return None


def score_problem(path: str) -> str | None:
    """Names the rows of ``path`` whose score is not a probability (NaN, Inf, outside [0, 1])."""
    import numpy as np

    scores = pq.read_table(path, columns=["score"]).column("score").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~((scores >= 0) & (scores <= 1)))  # NaN fails both tests
    if bad.size == 0:
        return None
    shown = ", ".join(str(i + 1) for i in bad[:5]) + (
        f" and {bad.size - 5} more" if bad.size > 5 else ""
    )
    example = scores[bad[0]]
    return (
        f"has {bad.size} scores that are not probabilities in [0, 1] (e.g. {example}) "
        f"in rows {shown} (counted from 1)"
    )


def scoring_files(root: str, name: str | None) -> dict[str, str]:
    """Where a scoring run's files go under ``root``: ``prefix``, ``summary``, ``rejects``.

    A prefix output (``--output DIR/NAME``): ``NAME-SSSSS-of-NNNNN.parquet``,
    ``NAME.summary.json`` and ``rejects/NAME.jsonl``. A folder output
    (``--output DIR/``, or an existing folder; ``name`` None): ordinary names,
    ``part-SSSSS-of-NNNNN.parquet``, ``summary.json``, ``rejects/rejects.jsonl``.
    The summary is written last.
    """
    root = root.rstrip("/")
    if name is None:
        return {
            "prefix": f"{root}/part",
            "summary": f"{root}/summary.json",
            "rejects": f"{root}/rejects/rejects.jsonl",
        }
    return {
        "prefix": f"{root}/{name}",
        "summary": f"{root}/{name}.summary.json",
        "rejects": f"{root}/rejects/{name}.jsonl",
    }


def summary(
    inputs: int,
    root: str,
    model_id: str,
    point: dict[str, Any] | None,
    pseudonymized: str | None,
    scored: int,
    by_reason: dict[str, int],
    files: list[str],
    rejects_file: str,
    results: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary of a scoring run: inputs = scored + rejected, files relative to ``root``.

    ``results`` (:func:`results_summary`) accounts for the Structured Reports
    written back; their rejects are in the rejects file but not in
    ``rejected``: such an image was scored.

    Raises:
        RuntimeError: when scored + rejected inputs do not add up.
    """
    document: dict[str, Any] = {
        "inputs": inputs,
        "scored": scored,
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "model_id": model_id,
        "operating_point": point,
        "pseudonymized": pseudonymized,
        # Relative to the folder of --output: the files are written elsewhere first.
        "files": sorted(posixpath.relpath(f, root) for f in files),
        "rejects_file": posixpath.relpath(rejects_file, root),
    }
    if results is not None:
        document["results"] = results
        accounted = results["stored"] + results["already_present"] + results["refused"]
        if accounted != scored:
            raise RuntimeError(f"accounting broken: {accounted} reports for {scored} scored")
    if document["scored"] + document["rejected"] != inputs:
        raise RuntimeError(
            f"accounting broken: {scored} scored + {document['rejected']} rejected != {inputs}"
        )
    return document


def results_summary(
    target: str, series: dict[str, Any], counts: dict[str, int], refused: dict[str, int]
) -> dict[str, Any]:
    """The summary's ``results``: where the reports went and what became of them.

    ``series`` holds the run's ``series_description`` and ``series_number``
    (the same in every study: how a user finds the run's series again).
    ``stored`` were written by this run, ``already_present`` were there from
    an earlier one (the same UIDs), ``refused`` are results-stage rejects by
    reason. Every scored image is in exactly one of the three.
    """
    return {
        "target": target,
        "series_description": series["series_description"],
        "series_number": series["series_number"],
        "stored": counts.get("stored", 0),
        "already_present": counts.get("already_present", 0),
        "refused": sum(refused.values()),
        "refused_by_reason": dict(sorted(refused.items())),
    }
