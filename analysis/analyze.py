"""Analysis job: metrics, plots and a report from prediction files only.

``xray-analyze --predictions 'PATH/*.parquet' --output_dir DIR [--history RESULTS/history.csv]
[--threshold model|youden|0.5|sens=0.9|spec=0.9|ppv=0.8] [--split test]
[--level image|study|patient] [--aggregate max|mean] [--bootstrap 1000] [--seed 0]
[--gallery EXPLAIN_DIR]`` (also ``python -m analysis.analyze``).

Writes ``DIR/metrics.json`` (schema below), ``DIR/plots/*.png`` and
``DIR/report.html``. By default the threshold is the model's operating point,
which the prediction files carry in their footers (chosen on the validation
split at training); a rule given with ``--threshold`` is chosen on the
validation split. It is never tuned on the split it is evaluated on unless
there is no other, and then the warnings say OPTIMISTIC.

metrics.json: ``schema_version``, ``split``, ``level``, ``threshold``
(rule, value, chosen_on, model_operating_point), ``metrics`` (n, patients, positives, prevalence,
roc_auc, average_precision, threshold, confusion_matrix, accuracy,
sensitivity, specificity, ppv, npv, f1, calibration{brier, ece, bins,
reliability[]}, ci95{auc, average_precision, sensitivity, specificity,
replicates_used, roc_band}), ``subgroups[]`` (attribute, value, n,
prevalence, roc_auc, roc_auc_ci95, sensitivity, specificity), ``leakage``,
``bootstrap`` (replicates, seed, unit), ``provenance``, ``warnings``; with ``--gallery``
also ``gallery`` (dir, split, threshold, files: the example images the report embeds,
``xray-explain``'s output, :mod:`beam_pipelines.contracts.gallery`).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
from typing import Any

import numpy as np
import pandas as pd

from analysis import metrics as m
from analysis import plots, report
from beam_pipelines.cli import main as cli_main
from beam_pipelines.cli import refuse
from beam_pipelines.contracts import gallery, operating_point, predictions
from beam_pipelines.storage.committer import open_output
from beam_pipelines.storage.files import flagged_input_problem

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: Below this many evaluated patients the report warns that its CIs mean little.
MIN_PATIENTS_FOR_CI = 10
# The contract's columns but the stored finding: the analysis recomputes it at
# the threshold it evaluates.
_COLUMNS = [name for name in predictions.COLUMNS if name != "predicted"]


def build_parser() -> argparse.ArgumentParser:
    """The job's flags."""
    parser = argparse.ArgumentParser(
        prog="xray-analyze", description="Metrics, plots and a report from prediction files."
    )
    parser.add_argument(
        "--predictions",
        required=True,
        nargs="+",
        help="Prediction Parquet files or globs (quote globs).",
    )
    parser.add_argument(
        "--output_dir", required=True, help="Where metrics.json, plots/ and report.html go."
    )
    parser.add_argument("--history", help="The trainer's history.csv, for the training plot.")
    parser.add_argument("--manifest", help="The preprocessing manifest.json, for provenance.")
    parser.add_argument(
        "--gallery",
        help="xray-explain's output folder: the report shows its example images (Grad-CAM).",
    )
    parser.add_argument(
        "--threshold",
        default="model",
        help="model (default: the operating point the prediction files carry, chosen on the "
        "validation split at training), or a rule chosen on the validation split: youden, "
        "sens=0.9, spec=0.9, ppv=0.8, or a fixed score like 0.5.",
    )
    parser.add_argument(
        "--split",
        default="test",
        help="Split to evaluate (default test; 'all' for every labelled row).",
    )
    parser.add_argument(
        "--level",
        choices=("image", "study", "patient"),
        default="image",
        help="Evaluate per image, per study or per patient (default image).",
    )
    parser.add_argument(
        "--aggregate",
        choices=("max", "mean"),
        default="max",
        help="How study/patient scores combine image scores (default max).",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="Patient-level bootstrap resamples for 95%% CIs (0: none).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Bootstrap seed.")
    parser.add_argument(
        "--verbose", action="store_true", help="On failure, show the full traceback."
    )
    return parser


def load(patterns: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Reads prediction files (the needed contract columns plus any extra ones)."""
    files = sorted(
        {f for p in patterns for f in (glob.glob(p) if any(c in p for c in "*?[") else [p])}
    )
    if not files:
        raise FileNotFoundError(f"no prediction files match {patterns}")
    for path in files:
        problem = predictions.file_problem(path) or predictions.score_problem(path)
        if problem:
            raise ValueError(f"{path} {problem}")
    table = predictions.read(files, columns=_COLUMNS, extra=predictions.extra_columns(files))
    return table.to_pandas(), files


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the analysis; returns the metrics.json document."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rule = None if args.threshold == "model" else m.parse_threshold_rule(args.threshold)
    except ValueError as exc:
        parser.error(str(exc))
    problem = flagged_input_problem([("--history", args.history), ("--manifest", args.manifest)])
    if problem:
        refuse(parser.prog, problem)
    try:
        frame, files = load(args.predictions)
        examples = gallery.read(args.gallery) if args.gallery else None
    except (FileNotFoundError, ValueError) as exc:
        refuse(parser.prog, str(exc))
    output = open_output("--output_dir", args.output_dir, "xray-analyze", inputs=tuple(files))
    with output:
        document = _analyze(parser, args, rule, frame, files, output.work, examples)
        output.commit(last="metrics.json")
    logger.info("Analysis written to %s", args.output_dir)
    return document


def _analyze(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    rule: tuple[str, float | None] | None,
    frame: pd.DataFrame,
    files: list[str],
    out: str,
    examples: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Computes the metrics and writes metrics.json, plots/ and report.html into ``out``.

    ``examples``: the gallery index of ``--gallery``, whose images the report shows.
    """
    warnings: list[str] = []
    leak = m.leakage(frame)
    if leak["patients_in_several_splits"]:
        _warn(
            warnings,
            f"LEAKAGE: {leak['patients_in_several_splits']} patients appear in more than "
            "one split; evaluation metrics are optimistic",
        )
    labelled, evaluated = _evaluated_rows(parser, args, frame, warnings)
    validation = m.aggregate(
        labelled[labelled["split"] == "validation"], args.level, args.aggregate
    )
    points = operating_point.from_footers(files)
    if rule is None and len(points) > 1:
        parser.error(
            f"the prediction files carry {len(points)} different operating points (several "
            "models?): choose one with --threshold"
        )
    threshold, chosen_on = _threshold(
        rule, points[0] if points else None, args.split, validation, evaluated, warnings
    )
    if args.level != "image" and chosen_on.startswith("model operating point"):
        _warn(
            warnings,
            f"the model's operating point was chosen on images; here it is applied to the "
            f"{args.aggregate} of each {args.level}'s image scores, so its sensitivity and "
            "specificity differ from the model card's (pass --threshold youden to choose one "
            f"on {args.level}-level validation scores)",
        )
    headline = m.summarize(evaluated, threshold, args.bootstrap, args.seed)
    # Subgroup intervals use fewer resamples: there are many subgroups.
    extras = [c for c in evaluated.columns if c not in _COLUMNS and c not in ("row",)]
    groups = m.subgroups(evaluated, threshold, min(args.bootstrap, 200), args.seed, extras)
    document: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "split": args.split,
        "level": args.level,
        "aggregate": args.aggregate if args.level != "image" else None,
        "threshold": {
            "rule": args.threshold,
            "value": threshold,
            "chosen_on": chosen_on,
            "model_operating_point": points[0] if len(points) == 1 else None,
        },
        "metrics": headline,
        "subgroups": groups,
        "leakage": leak,
        "bootstrap": {"replicates": args.bootstrap, "seed": args.seed, "unit": "patient"},
        "provenance": _provenance(frame, files, args.manifest),
        "warnings": warnings,
    }
    if examples is not None:
        document["gallery"] = _gallery(args.gallery, examples, args.split, warnings)
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    plot_files = _plots(document, evaluated, args.history, os.path.join(out, "plots"))
    with open(os.path.join(out, "metrics.json"), "w") as handle:
        json.dump(document, handle, indent=2, sort_keys=True, allow_nan=False)
        handle.write("\n")
    shown = (args.gallery, examples) if examples is not None else None
    report.write(os.path.join(out, "report.html"), document, plot_files, shown)
    return document


def _gallery(
    folder: str, examples: dict[str, Any], split: str, warnings: list[str]
) -> dict[str, Any]:
    """metrics.json's account of the example gallery the report shows."""
    if examples["split"] != split:
        _warn(
            warnings,
            f"the example gallery shows the {examples['split']} split; the metrics are of {split}",
        )
    return {
        "dir": folder,
        "split": examples["split"],
        "threshold": examples["threshold"],
        "files": [image["file"] for image in examples["images"]],
    }


def _warn(warnings: list[str], message: str) -> None:
    """Logs a warning and keeps it for metrics.json and the report."""
    logger.warning(message)
    warnings.append(message)


def _evaluated_rows(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    frame: pd.DataFrame,
    warnings: list[str],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(labelled rows, the rows evaluated: the split asked for, aggregated by --level)."""
    labelled = frame.dropna(subset=["label"])
    if args.split == "all":
        evaluated = labelled
    else:
        evaluated = labelled[labelled["split"] == args.split]
        if evaluated.empty and labelled["split"].isna().all():
            warnings.append(
                f"predictions carry no split; evaluating all {len(labelled)} labelled rows"
            )
            evaluated = labelled
    if evaluated.empty or evaluated["label"].nunique() < 2:
        parser.error(f"split {args.split!r} has no labelled rows of both classes to evaluate")
    patients = evaluated["patient_id"].nunique(dropna=True)
    if patients < MIN_PATIENTS_FOR_CI:
        _warn(
            warnings,
            f"only {patients} patients in the evaluated split: the 95% confidence intervals "
            f"(patient bootstrap) mean little below {MIN_PATIENTS_FOR_CI}",
        )
    return labelled, m.aggregate(evaluated, args.level, args.aggregate)


def _provenance(frame: pd.DataFrame, files: list[str], manifest: str | None) -> dict[str, Any]:
    """Which files and rows the analysis read, and the preprocessing manifest's digest."""
    return {
        "prediction_files": files,
        "rows": int(len(frame)),
        "rows_per_split": {
            str(k): int(v)
            for k, v in frame["split"].fillna("none").value_counts().sort_index().items()
        },
        "model_ids": sorted(frame["model_id"].dropna().unique().tolist()),
        "manifest_sha256": _digest(manifest),
    }


def _threshold(
    rule: tuple[str, float | None] | None,
    point: dict[str, Any] | None,
    split: str,
    validation: pd.DataFrame,
    evaluated: pd.DataFrame,
    warnings: list[str],
) -> tuple[float, str]:
    """The threshold to evaluate at, and what it was chosen on.

    ``rule`` None means the model's operating point: the one the files
    carry, else Youden's J on the validation split. A rule is chosen on the
    validation split; only without one on the evaluated data itself, with a
    loud warning (its sensitivity and specificity are then optimistic).
    """
    if rule is None:
        if point is not None:
            if split == point["chosen_on"]:
                message = (
                    f"OPTIMISTIC: the model's threshold was chosen on the {split} split, the "
                    "one evaluated: its sensitivity, specificity and accuracy flatter the model"
                )
                logger.warning(message)
                warnings.append(message)
            return float(point["threshold"]), (
                f"model operating point ({point['rule']}, chosen on {point['chosen_on']})"
            )
        rule = ("youden", None)
    if rule[0] == "fixed":
        return m.choose_threshold(np.array([]), np.array([]), rule), "fixed"
    if split != "validation" and validation["label"].nunique() == 2:
        labels = validation["label"].to_numpy().astype(int)
        return m.choose_threshold(labels, validation["score"].to_numpy(), rule), "validation"
    message = (
        "OPTIMISTIC: the threshold was chosen on the evaluated predictions themselves (no "
        "validation split and no model operating point): sensitivity, specificity and accuracy "
        "are better than the model would do at a threshold fixed beforehand"
    )
    logger.warning(message)
    warnings.append(message)
    labels = evaluated["label"].to_numpy().astype(int)
    threshold = m.choose_threshold(labels, evaluated["score"].to_numpy(), rule)
    return threshold, f"{split} (no separate validation split)"


def _digest(path: str | None) -> str | None:
    if not path:
        return None
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _plots(
    document: dict[str, Any], frame: pd.DataFrame, history_csv: str | None, out: str
) -> dict[str, str]:
    headline = document["metrics"]
    labels = frame["label"].to_numpy().astype(int)
    scores = frame["score"].to_numpy().astype(float)
    ci = headline["ci95"]
    point = (
        (1 - headline["specificity"], headline["sensitivity"])
        if headline["specificity"] is not None
        else None
    )
    files: dict[str, str | None] = {
        "ROC curve": plots.roc(
            labels, scores, headline["roc_auc"], ci.get("roc_band"), ci.get("auc"), point, out
        ),
        "Precision-recall": plots.precision_recall(
            labels, scores, headline["average_precision"], out
        ),
        "Confusion matrix": plots.confusion(
            headline["confusion_matrix"], headline["threshold"], out
        ),
        "Reliability": plots.reliability(
            headline["calibration"]["reliability"],
            headline["calibration"]["ece"],
            headline["calibration"]["brier"],
            out,
        ),
        "Score distributions": plots.score_distributions(frame, headline["threshold"], out),
        "Subgroup AUC": plots.subgroup_forest(document["subgroups"], headline["roc_auc"], out),
    }
    if history_csv:
        files = {"Training history": plots.history(history_csv, out), **files}
    return {name: path for name, path in files.items() if path}


def _describe(document: dict[str, Any]) -> str:
    headline = document["metrics"]
    ci = headline["ci95"].get("auc")
    shown = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
    return (
        f"xray-analyze: {document['split']} AUC {headline['roc_auc']:.3f}{shown}, "
        f"sensitivity {headline['sensitivity']:.3f}, specificity {headline['specificity']:.3f} "
        f"at threshold {headline['threshold']:.3f}"
    )


def main() -> None:
    """Console entry point: ``xray-analyze``."""
    cli_main("xray-analyze", run, _describe)


if __name__ == "__main__":
    main()
