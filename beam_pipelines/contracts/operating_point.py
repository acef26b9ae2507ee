"""The model's operating point: the threshold chosen on the validation split at training.

One contract, three users: the trainer chooses it and stores it in
``model_card.json`` and in the exported model folder
(``model/operating_point.json``); the scorer reads it from the model folder to
fill the predictions' ``predicted`` column; the analysis reads it from the
prediction files' footers (Parquet key-value metadata, written by both
producers), so evaluated predictions without a validation split are judged at
the model's own threshold instead of one tuned on themselves.

Document: ``{"rule": "youden", "threshold": 0.42, "chosen_on": "validation",
"validation": {"n": 120, "sensitivity": 0.9, "specificity": 0.8}}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

FILE = "operating_point.json"
#: The Parquet footer key under which prediction files carry the operating point.
FOOTER_KEY = b"xray.operating_point"
#: Operating-point rules the trainer accepts (``--operating_point``).
RULE_HELP = "youden | sens=0.90 | spec=0.90 | ppv=0.80"


def check_rule(text: str) -> str:
    """The rule, validated (fixed numbers are not rules: a threshold is chosen on data).

    Raises:
        ValueError: for anything but youden, sens=X, spec=X, ppv=X.
    """
    from analysis import metrics

    kind, _ = metrics.parse_threshold_rule(text)
    if kind == "fixed":
        raise ValueError(f"operating_point must be {RULE_HELP}, not a fixed number ({text!r})")
    return text.strip().lower()


def choose(labels: Sequence[int], scores: Sequence[float], rule: str) -> dict[str, Any]:
    """Chooses the operating point on labelled validation predictions.

    Raises:
        ValueError: without both classes among the labels.
    """
    from analysis import metrics

    y = np.asarray(labels, dtype=int)
    p = np.asarray(scores, dtype=float)
    cut = metrics.choose_threshold(y, p, metrics.parse_threshold_rule(rule))
    # The rule's cut is a validation score itself; halfway down to the next
    # lower score makes the same decisions on validation and keeps that very
    # image from flipping when another runner scores it a last bit lower.
    # Representable in float32 (the scores' type in prediction files), so every
    # reader compares against the same number; adjacent scores keep the cut.
    below = p[p < cut]
    threshold = cut
    if below.size:
        halfway = float(np.float32((cut + below.max()) / 2))
        threshold = halfway if below.max() < halfway <= cut else cut
    rates = metrics.at_threshold(y, p, threshold)
    return {
        "rule": rule,
        "threshold": threshold,
        "chosen_on": "validation",
        "validation": {
            "n": int(y.size),
            "sensitivity": rates["sensitivity"],
            "specificity": rates["specificity"],
            "ppv": rates["ppv"],
        },
    }


def predicted(scores: Sequence[float], point: dict[str, Any] | None) -> list[int | None]:
    """The 0/1 finding at the operating point (``score >= threshold``); None without one."""
    if point is None:
        return [None] * len(scores)
    threshold = float(point["threshold"])
    return [int(score >= threshold) for score in scores]


def write(model_dir: str, point: dict[str, Any]) -> None:
    """Stores the operating point in the exported model folder."""
    with open(os.path.join(model_dir, FILE), "w") as handle:
        json.dump(point, handle, indent=2, sort_keys=True)
        handle.write("\n")


def read(model_dir: str) -> dict[str, Any] | None:
    """The operating point stored in a model folder (any Beam filesystem), or None."""
    from beam_pipelines.storage.files import input_file_problem, read_bytes

    path = f"{model_dir.rstrip('/')}/{FILE}"
    if input_file_problem(path):
        return None
    point = json.loads(read_bytes(path))
    float(point["threshold"])  # a document without a threshold is no operating point
    return point


def footer(point: dict[str, Any] | None) -> dict[bytes, bytes]:
    """The Parquet key-value metadata that carries the operating point."""
    return {} if point is None else {FOOTER_KEY: json.dumps(point, sort_keys=True).encode()}


def from_footers(paths: Sequence[str]) -> list[dict[str, Any]]:
    """The distinct operating points the prediction files carry (footers only)."""
    import pyarrow.parquet as pq

    found: list[dict[str, Any]] = []
    for path in paths:
        raw = (pq.read_schema(path).metadata or {}).get(FOOTER_KEY)
        if raw is not None:
            point = json.loads(raw)
            if point not in found:
                found.append(point)
    return found
