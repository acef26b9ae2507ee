"""The manifest contract: ``manifest.json``, written last by preprocessing, read by training.

It says what the shards hold (schema version, image layout, counts per split
and label, the training pixels' mean and std), where every output file is
(relative paths), why rows were rejected, and with which settings and
versions the run was made. A folder with a manifest.json is a complete
preprocessing output.
"""

from __future__ import annotations

import platform
import posixpath
from typing import Any

from beam_pipelines.contracts import records
from beam_pipelines.contracts.splits import SPLITS

FILE = "manifest.json"
LABELS = ("normal", "abnormal")


def count_key(split: str, label: int | bool) -> str:
    """The key a kept record is counted under while the job runs: ``split/label``."""
    return f"{split}/{LABELS[int(bool(label))]}"


def build(
    input_rows: int,
    settings: dict[str, Any],
    out: str,
    kept_stats: dict[str, Any],
    rejected: dict[str, int],
    files: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of a run whose outputs are written under ``out``.

    Args:
        kept_stats: ``{"counts": {count_key: records}, "pixels": {...}}``.
        rejected: rejects per reason.
        files: absolute paths: ``shards`` (a list), ``rejects``, ``splits``.

    Raises:
        RuntimeError: when kept + rejected rows do not add up to the input rows.
    """
    from importlib.metadata import version

    kept = kept_stats["counts"]
    per_split = {
        name: {label: kept.get(f"{name}/{label}", 0) for label in LABELS} for name in SPLITS
    }
    manifest: dict[str, Any] = {
        "schema_version": records.SCHEMA_VERSION,
        "image": {
            "shape": list(records.IMAGE_SHAPE),
            "stored_bits": records.IMAGE_BITS,
            "range": [0, 1],
        },
        "input_rows": input_rows,
        "kept": sum(kept.values()),
        "rejected": sum(rejected.values()),
        "counts": per_split,
        "rejected_by_reason": dict(sorted(rejected.items())),
        "files": {
            "shards": sorted(posixpath.relpath(p, out) for p in files["shards"]),
            "rejects": posixpath.relpath(files["rejects"], out),
            "splits": posixpath.relpath(files["splits"], out),
        },
        "train_pixel_stats": kept_stats["pixels"],
        "options": settings,
        "versions": {
            "python": platform.python_version(),
            # Package metadata, not imports: workers never load TensorFlow.
            **{name: version(name) for name in ("apache-beam", "tensorflow", "pydicom", "numpy")},
        },
    }
    if manifest["kept"] + manifest["rejected"] != input_rows:
        # Should be impossible; say so loudly rather than write a wrong manifest.
        raise RuntimeError(
            f"row accounting broken: {manifest['kept']} kept + {manifest['rejected']} "
            f"rejected != {input_rows} input rows"
        )
    return manifest
