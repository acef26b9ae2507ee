"""Explain job: an example gallery with Grad-CAM overlays, for the analysis report.

``xray-explain --model RESULTS/model --predictions 'RESULTS/predictions/test.parquet'
--data_dir PREPROCESSED --output_dir DIR [--split test] [--per_group 4] [--threshold T]``
(also ``python -m explain.explain``).

The analysis reads files only; this job runs where the model and the images
are. For the evaluated split it picks the most confident false positives
(highest scores among normal images called abnormal), the most confident
false negatives (lowest scores among abnormal images called normal) and
typical true positives and negatives (the scores nearest each group's
median), ``--per_group`` of each where the split has them (one image per
patient before any patient's second), at the model's operating point (the
prediction files' footers) or ``--threshold``. It reads those images from
the preprocessed shards (the model's very input), checks that the model
scores them as the prediction files say, and writes
``DIR/gallery/<group>_<rank>.png`` (the input beside its Grad-CAM overlay,
:mod:`explain.gradcam`) and ``DIR/gallery.json`` (the index,
:mod:`beam_pipelines.contracts.gallery`), which ``xray-analyze --gallery DIR``
embeds in its report.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import numpy as np
import pandas as pd

from beam_pipelines.cli import main as cli_main
from beam_pipelines.cli import refuse
from beam_pipelines.contracts import gallery, manifest, operating_point
from beam_pipelines.storage.committer import open_output
from beam_pipelines.storage.files import input_file_problem, read_json

logger = logging.getLogger(__name__)

#: Largest difference between the model's score and the prediction file's
#: that still means the same model (other hardware or batch composition).
SCORE_TOLERANCE = 0.01


def build_parser() -> argparse.ArgumentParser:
    """The job's flags."""
    parser = argparse.ArgumentParser(
        prog="xray-explain",
        description="An example gallery (confident errors, typical cases) with Grad-CAM overlays.",
    )
    parser.add_argument("--model", required=True, help="The exported model folder, RESULTS/model.")
    parser.add_argument(
        "--predictions",
        required=True,
        nargs="+",
        help="Prediction Parquet files or globs of the model (quote globs).",
    )
    parser.add_argument(
        "--data_dir", required=True, help="The preprocessed shards the predictions were made on."
    )
    parser.add_argument(
        "--output_dir", required=True, help="Where gallery.json and gallery/*.png go."
    )
    parser.add_argument("--split", default="test", help="The split to show (default test).")
    parser.add_argument(
        "--per_group",
        type=int,
        default=4,
        help="Images per group: false positives, false negatives, true positives, true "
        "negatives (default 4).",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="Score at or above which an image is called abnormal (default: the model's "
        "operating point, which the prediction files carry).",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="On failure, show the full traceback."
    )
    return parser


def choose(
    frame: pd.DataFrame, threshold: float, per_group: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The gallery's images of a split's labelled rows, and how many each group has.

    Returns:
        (rows: the contract's image fields but ``file``, in group and rank
        order; the count of each group's images in ``frame``).
    """
    frame = frame.drop_duplicates("dicom_path").reset_index(drop=True)
    scores = frame["score"].to_numpy(dtype=float)
    called = np.array(operating_point.predicted(scores, {"threshold": threshold}), dtype=int)
    labels = frame["label"].to_numpy(dtype=int)
    chosen: list[dict[str, Any]] = []
    available: dict[str, int] = {}
    for group in gallery.GROUPS:
        truth = 1 if group in ("false_negative", "true_positive") else 0
        call = 1 if group in ("false_positive", "true_positive") else 0
        members = frame[(labels == truth) & (called == call)]
        available[group] = len(members)
        score = members["score"].astype(float)
        if group == "false_positive":
            key = -score  # the most confident first
        elif group == "false_negative":
            key = score
        else:
            key = (score - score.median()).abs()  # the most typical first
        ordered = members.assign(_key=key).sort_values(["_key", "dicom_path"], kind="stable")
        # One image per patient first: four views of one patient show less than four patients.
        turn = ordered.groupby("patient_id", dropna=False, sort=False).cumcount()
        ordered = ordered.assign(_turn=turn).sort_values("_turn", kind="stable")
        for rank, row in enumerate(ordered.head(per_group).itertuples(index=False), start=1):
            chosen.append(
                {
                    "group": group,
                    "rank": rank,
                    "score": float(row.score),
                    "label": truth,
                    "predicted": call,
                    "view_position": _text(row.view_position),
                    "patient_id": _text(row.patient_id),
                    "dicom_path": row.dicom_path,
                }
            )
    return chosen, available


def _text(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the job; returns the gallery.json document."""
    parser = build_parser()
    args = parser.parse_args(argv)
    plan = _preflight(parser, args)
    output = open_output(
        "--output_dir",
        args.output_dir,
        "xray-explain",
        inputs=(f"{args.model.rstrip('/')}/model.keras", *plan["files"]),
    )
    with output:
        document = _explain(args, plan, output.work)
        output.commit(last=gallery.FILE)
    logger.info("Gallery written to %s", args.output_dir)
    return document


def _preflight(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Checks every flag and input before any work (exit 2 with the reason); returns the plan."""
    from analysis.analyze import load
    from beam_pipelines.transforms.inference import model_file_problem

    if args.per_group < 1:
        parser.error("--per_group must be >= 1")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        parser.error(f"--threshold must be a score in [0, 1], got {args.threshold}")
    manifest_path = f"{args.data_dir.rstrip('/')}/{manifest.FILE}"
    problem = input_file_problem(manifest_path)
    if problem:
        refuse(parser.prog, f"--data_dir {args.data_dir}: {manifest_path} {problem}")
    try:
        frame, files = load(args.predictions)
    except (FileNotFoundError, ValueError) as exc:
        refuse(parser.prog, str(exc))
    rows = frame[(frame["split"] == args.split) & frame["label"].notna()]
    if rows.empty:
        refuse(parser.prog, f"the predictions have no labelled rows of split {args.split!r}")
    models = sorted(rows["model_id"].dropna().unique().tolist())
    if len(models) > 1:
        refuse(parser.prog, f"the predictions of split {args.split!r} come from models {models}")
    if args.threshold is not None:
        threshold, source = args.threshold, "--threshold"
    else:
        points = operating_point.from_footers(files)
        if len(points) != 1:
            refuse(
                parser.prog,
                f"the prediction files carry {len(points)} operating points: give --threshold",
            )
        point = points[0]
        threshold = float(point["threshold"])
        source = f"model operating point ({point['rule']}, chosen on {point['chosen_on']})"
    problem = model_file_problem(args.model)  # last: it reads the whole model file
    if problem:
        refuse(parser.prog, f"--model {args.model}: {problem}")
    settings = (read_json(manifest_path) or {}).get("options") or {}
    return {
        "files": files,
        "rows": rows,
        "threshold": threshold,
        "threshold_source": source,
        "model_id": models[0] if models else None,
        "pseudonymized": settings.get("pseudonymized"),
    }


def _explain(args: argparse.Namespace, plan: dict[str, Any], out: str) -> dict[str, Any]:
    """Chooses the images, computes their heat maps, writes the PNGs and gallery.json."""
    from PIL import Image

    from beam_pipelines.transforms.inference import KerasModelHandler
    from explain.gradcam import Explainer, overlay

    chosen, available = choose(plan["rows"], plan["threshold"], args.per_group)
    images = _read_images(args.data_dir, args.split, [row["dicom_path"] for row in chosen])
    model = KerasModelHandler(args.model).load_model()
    scores = np.asarray(model(images, training=False), dtype=float).reshape(-1)
    expected = np.array([row["score"] for row in chosen])
    worst = int(np.argmax(np.abs(scores - expected)))
    if abs(scores[worst] - expected[worst]) > SCORE_TOLERANCE:
        raise ValueError(
            f"the model scores {chosen[worst]['dicom_path']} {scores[worst]:.4f}, the "
            f"predictions say {expected[worst]:.4f}: is --model the model that made them?"
        )
    explainer = Explainer(model)
    heat = explainer.heatmaps(images)
    os.makedirs(os.path.join(out, gallery.FOLDER), exist_ok=True)
    for row, image, heat_map in zip(chosen, images, heat, strict=True):
        row["file"] = gallery.image_file(row["group"], row["rank"])
        Image.fromarray(overlay(image, heat_map)).save(os.path.join(out, row["file"]))
    document = gallery.build(
        args.split,
        plan["threshold"],
        plan["threshold_source"],
        plan["model_id"],
        explainer.layers,
        plan["pseudonymized"],
        available,
        chosen,
    )
    gallery.write(out, document)
    return document


def _read_images(data_dir: str, split: str, paths: list[str]) -> np.ndarray:
    """The split's records of ``paths``, in that order, as a ``(n, 224, 224, 1)`` batch.

    Raises:
        ValueError: when an image is in none of the split's shards.
    """
    from beam_pipelines.contracts.records import IMAGE_SHAPE, parse_example
    from beam_pipelines.storage.tfrecord import read_tfrecord_gz
    from trainer.data import shard_files

    found: dict[str, np.ndarray] = {}
    wanted = set(paths)
    for shard in shard_files(data_dir, split):
        for serialized in read_tfrecord_gz(shard):
            record = parse_example(serialized)
            if record["dicom_path"] in wanted:
                found[record["dicom_path"]] = record["image"]
        if len(found) == len(wanted):
            break
    missing = [path for path in paths if path not in found]
    if missing:
        raise ValueError(
            f"{len(missing)} chosen images (e.g. {missing[0]}) are in no {split} shard of "
            f"{data_dir}: were the predictions made from these shards?"
        )
    return np.stack([found[path] for path in paths]).reshape(-1, *IMAGE_SHAPE)


def _describe(document: dict[str, Any]) -> str:
    counts = ", ".join(
        f"{group.replace('_', ' ')}s {entry['shown']} of {entry['available']}"
        for group, entry in document["groups"].items()
    )
    return (
        f"xray-explain: split {document['split']} at threshold {document['threshold']:.3f}: "
        f"{counts}; Grad-CAM on {', '.join(document['layers'])}"
    )


def main() -> None:
    """Console entry point: ``xray-explain``."""
    cli_main("xray-explain", run, _describe)


if __name__ == "__main__":
    main()
