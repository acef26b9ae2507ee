"""The gallery contract: ``gallery.json`` and ``gallery/*.png`` (xray-explain -> xray-analyze).

``xray-explain`` picks example images of one evaluated split and writes each
as a PNG (the model input beside it with its Grad-CAM heat map overlaid) and
an index, ``gallery.json``, which the analysis report embeds. This module
owns the index's fields and the file names; plain Python, no TensorFlow.

Document::

    {"schema_version": 1, "split": "test", "threshold": 0.42,
     "threshold_source": "model operating point (youden, chosen on validation)",
     "model_id": "simple_cnn-0123abcd4567", "method": "grad-cam",
     "layers": ["activation_3"], "pseudonymized": "<key fingerprint>" | null,
     "groups": {"false_positive": {"available": 7, "shown": 4}, ...},
     "images": [{"group": "false_positive", "rank": 1,
                 "file": "gallery/false_positive_1.png", "score": 0.97, "label": 0,
                 "predicted": 1, "view_position": "PA", "patient_id": "...",
                 "dicom_path": "..."}, ...]}

``groups`` has every group of :data:`GROUPS`; ``available`` counts the
split's images in the group, ``shown`` those in ``images``. ``rank`` 1 is
the most confident error (false positives: highest score first; false
negatives: lowest first) or the most typical correct case (the score
nearest the group's median); one image per patient comes before any
patient's second. ``pseudonymized`` is the fingerprint of the
key the data's identifiers were pseudonymized with (null: they are the
archive's own). ``file`` is relative to the folder holding gallery.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

FILE = "gallery.json"
FOLDER = "gallery"
SCHEMA_VERSION = 1
#: The groups, in the order a report shows them.
GROUPS: tuple[str, ...] = ("false_positive", "false_negative", "true_positive", "true_negative")
TITLES = {
    "false_positive": "Most confident false positives",
    "false_negative": "Most confident false negatives",
    "true_positive": "Typical true positives",
    "true_negative": "Typical true negatives",
}
IMAGE_FIELDS: tuple[str, ...] = (
    "group",
    "rank",
    "file",
    "score",
    "label",
    "predicted",
    "view_position",
    "patient_id",
    "dicom_path",
)
_FIELDS: tuple[str, ...] = (
    "schema_version",
    "split",
    "threshold",
    "threshold_source",
    "model_id",
    "method",
    "layers",
    "pseudonymized",
    "groups",
    "images",
)


def image_file(group: str, rank: int) -> str:
    """An image's file, relative to the gallery folder: ``gallery/<group>_<rank>.png``."""
    if group not in GROUPS:
        raise ValueError(f"unknown gallery group {group!r}; groups are {GROUPS}")
    return f"{FOLDER}/{group}_{rank}.png"


def build(
    split: str,
    threshold: float,
    threshold_source: str,
    model_id: str | None,
    layers: Sequence[str],
    pseudonymized: str | None,
    available: Mapping[str, int],
    images: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The index document (images in :data:`GROUPS` order, then by rank).

    Raises:
        ValueError: for an image without the contract's fields or of an unknown group.
    """
    shown = {group: 0 for group in GROUPS}
    rows = []
    for image in images:
        missing = [name for name in IMAGE_FIELDS if name not in image]
        if missing:
            raise ValueError(f"gallery image without {missing}")
        image_file(image["group"], image["rank"])  # a known group
        shown[image["group"]] += 1
        rows.append({name: image[name] for name in IMAGE_FIELDS})
    rows.sort(key=lambda row: (GROUPS.index(row["group"]), row["rank"]))
    return {
        "schema_version": SCHEMA_VERSION,
        "split": split,
        "threshold": float(threshold),
        "threshold_source": threshold_source,
        "model_id": model_id,
        "method": "grad-cam",
        "layers": list(layers),
        "pseudonymized": pseudonymized,
        "groups": {
            group: {"available": int(available.get(group, 0)), "shown": shown[group]}
            for group in GROUPS
        },
        "images": rows,
    }


def write(folder: str, document: Mapping[str, Any]) -> str:
    """Writes ``folder/gallery.json`` (sorted keys, two-space indent, final newline)."""
    path = os.path.join(folder, FILE)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, sort_keys=True, allow_nan=False)
        handle.write("\n")
    return path


def read(folder: str) -> dict[str, Any]:
    """Reads and checks a gallery folder's index (every image it lists must exist).

    Raises:
        ValueError: a missing, unreadable or incomplete index, or a listed image missing.
    """
    path = os.path.join(folder, FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except OSError as exc:
        raise ValueError(
            f"{path} cannot be read ({exc.strerror}): is it xray-explain's output?"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc})") from exc
    if not isinstance(document, dict) or document.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path} is not a gallery index of schema version {SCHEMA_VERSION}")
    missing = [name for name in _FIELDS if name not in document]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    for image in document["images"]:
        absent = [name for name in IMAGE_FIELDS if name not in image]
        if absent or image["group"] not in GROUPS:
            raise ValueError(f"{path} lists an image without {absent or 'a known group'}")
        if not os.path.isfile(os.path.join(folder, image["file"])):
            raise ValueError(f"{path} lists {image['file']}, which is missing")
    return document
