"""Training recipe ablation and robustness check on real chest X-rays; prints JSON.

``.venv/bin/python benchmarks/recipe_ablation.py [--data kermany|nih]
[--holdout patients|later_ids] [--epochs N] [--variants default,ensemble3,...]
[--workdir /tmp/recipe_ablation]``

1. Imports the labelled set from ``../shared/data`` with ``xray-import`` and
   preprocesses it with ``xray-preprocess --split 0.7,0.15,0.15`` (patients
   never cross splits; cached under ``--workdir``). ``--holdout patients``
   draws the test patients at random; ``--holdout later_ids`` pins the
   highest-numbered 15% of patients of each ID family (``IM-0123`` and
   ``person45`` are families ``IM-N`` and ``personN``) to test through
   ``--pin_splits``: IDs are issued in time order, so this is a temporal
   hold-out, the closest proxy here for a later acquisition.
2. Trains each recipe variant with ``xray-train`` (one subprocess each, the
   same epoch budget and seed), timing the wall clock.
3. Scores the held-out test patients' DICOM files with ``xray-score`` (the
   whole path a user runs: preprocess, train, score, timed) and, with the
   exported model on their shards, reports AUROC and
   accuracy / sensitivity / specificity at the model's own operating point
   (``model_card.json``, chosen on validation), then AUROC again under each
   controlled acquisition shift of :data:`trainer.shifts.ROBUSTNESS_SHIFTS`
   (gamma, contrast, noise, blur, half resolution, tighter and wider framing),
   a proxy for a new site; ``worst`` is the lowest of them.

Prints one JSON document (every variant's flags, wall time and figures) and
writes ``table.md`` beside it for the README.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: The acquisition-shift augmentation (trainer/shifts.py; off by default).
SHIFT_AUG = ["--gamma", "0.4", "--blur_sigma", "1.0", "--resolution_jitter", "0.4"]
SHIFT_AUG += ["--noise_std", "0.03"]
#: Shift augmentation with wider geometry and intensity ranges (framing and
#: exposure differ between sites as much as the detector does).
STRONG_AUG = [*SHIFT_AUG, "--rotation_degrees", "10", "--shift_fraction", "0.1"]
STRONG_AUG += ["--zoom_fraction", "0.2", "--brightness", "0.15", "--contrast", "0.2"]
#: Recipe variants: name -> xray-train flags on top of the defaults, so
#: "default" is the recipe a user gets.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "shift_aug": SHIFT_AUG,
    "shift_aug_adamw_cosine": [
        *SHIFT_AUG, "--optimizer", "adamw", "--lr_schedule", "cosine", "--warmup_epochs", "1",
    ],
    "shift_aug_label_smoothing": [*SHIFT_AUG, "--label_smoothing", "0.1"],
    "shift_aug_ensemble2": [*SHIFT_AUG, "--ensemble", "2"],
    "ensemble3": ["--ensemble", "3"],
    "strong_aug": STRONG_AUG,
    "strong_aug_ensemble3": [*STRONG_AUG, "--ensemble", "3"],
    "steps100": ["--steps_per_epoch", "100"],
    # Epochs of one pass however small the data set (the recipe before 3e5cf84).
    "one_pass_epochs": ["--min_steps_per_epoch", "0"],
}  # fmt: skip

DATA = {"kermany": "cxr_kermany_pediatric_train", "nih": "cxr_nih_pneumonia_dev"}
HOLDOUTS = ("patients", "later_ids")
#: The share of each ID family's patients that ``later_ids`` holds out.
LATER_FRACTION = 0.15


def _run(command: list[str], log: Path) -> float:
    started = time.monotonic()
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed (exit {done.returncode}); see {log}")
    return time.monotonic() - started


def later_ids(metadata: Path, pins: Path, fraction: float = LATER_FRACTION) -> int:
    """Writes a splits.csv pinning each ID family's highest-numbered patients to test.

    A family is the patient ID with its digit runs replaced by ``N``; within
    it patients are ordered by their last number. IDs without digits are
    left to the random split. Returns how many patients were pinned.
    """
    families: dict[str, set[str]] = {}
    with metadata.open(newline="") as handle:
        for row in csv.DictReader(handle):
            patient = row["PatientID"]
            if re.search(r"\d", patient):
                families.setdefault(re.sub(r"\d+", "N", patient), set()).add(patient)
    pinned: list[str] = []
    for patients in families.values():
        ordered = sorted(patients, key=lambda p: (int(re.findall(r"\d+", p)[-1]), p))
        pinned += ordered[len(ordered) - round(len(ordered) * fraction) :]
    with pins.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["PatientID", "split"])
        writer.writerows([patient, "test"] for patient in sorted(pinned))
    return len(pinned)


def prepare(data: str, workdir: Path, data_root: Path, holdout: str = "patients") -> Path:
    """Imports and preprocesses the data set once; returns the preprocessed folder.

    The preprocessing's wall time is kept beside it (``<folder>.seconds``)
    for the whole-path time of later, cached runs.
    """
    archive = workdir / data / "archive"
    preprocessed = workdir / data / ("preprocessed" if holdout == "patients" else holdout)
    (workdir / data).mkdir(parents=True, exist_ok=True)
    if not (archive / "metadata.csv").exists():
        labels = data_root / DATA[data] / "labels.csv"
        _run(
            [str(BIN / "xray-import"), "--labels_csv", str(labels), "--output_dir", str(archive)],
            workdir / data / "import.log",
        )
    if not (preprocessed / "commit.json").exists():
        pins = []
        if holdout == "later_ids":
            later_ids(archive / "metadata.csv", workdir / data / "later_ids_splits.csv")
            pins = ["--pin_splits", str(workdir / data / "later_ids_splits.csv")]
        seconds = _run(
            [
                str(BIN / "xray-preprocess"),
                "--metadata", str(archive / "metadata.csv"),
                "--output_dir", str(preprocessed),
                "--split", "0.7,0.15,0.15",
                "--seed", "0",
                *pins,
            ],
            workdir / data / f"preprocess_{holdout}.log",
        )  # fmt: skip
        preprocessed.with_suffix(".seconds").write_text(f"{seconds:.1f}\n")
    return preprocessed


def score_test_images(
    results: Path, preprocessed: Path, archive: Path, out: Path
) -> dict[str, Any]:
    """Scores the test patients' DICOM files with ``xray-score``, as a user would.

    The rows of ``metadata.csv`` whose patients ``splits.csv`` puts in test
    go to ``xray-score --metadata``; AUROC and accuracy come from its
    predictions (``predicted``: the model's own operating point), so the
    whole path, decoding included, is measured, not just the model.
    """
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    with (preprocessed / "splits.csv").open(newline="") as handle:
        test = {r["PatientID"] for r in csv.DictReader(handle) if r["split"] == "test"}
    out.mkdir(parents=True, exist_ok=True)
    metadata = out / "test_metadata.csv"
    with (archive / "metadata.csv").open(newline="") as source, metadata.open("w") as target:
        reader = csv.DictReader(source)
        writer = csv.DictWriter(target, fieldnames=reader.fieldnames or [])
        writer.writeheader()
        writer.writerows(r for r in reader if r["PatientID"] in test)
    command = [
        str(BIN / "xray-score"),
        "--model", str(results / "model"),
        "--metadata", str(metadata),
        "--archive_root", str(archive),
        "--output", str(out / "scores" / "test"),
    ]  # fmt: skip
    seconds = _run(command, out / "score.log")
    scored = pd.concat(pd.read_parquet(f) for f in sorted((out / "scores").glob("test-*.parquet")))
    labels = scored["label"].astype(int)
    return {
        "score_wall_s": seconds,
        "scored_images": int(len(scored)),
        "scored_auroc": float(roc_auc_score(labels, scored["score"])),
        "scored_accuracy": float((scored["predicted"] == labels).mean()),
    }


def evaluate(results: Path, preprocessed: Path) -> dict[str, Any]:
    """Test AUROC and rates at the model's operating point, then AUROC under each shift."""
    import keras
    import numpy as np
    import tensorflow as tf
    from sklearn.metrics import roc_auc_score

    from trainer import data, shifts
    from trainer.config import TrainConfig

    card = json.loads((results / "model_card.json").read_text())
    model = keras.saving.load_model(str(results / "model" / "model.keras"), safe_mode=True)
    config = TrainConfig(data_dir=str(preprocessed), output_dir="unused", global_batch_size=64)
    batches = data.evaluation_dataset(config, data.shard_files(str(preprocessed), "test"), True)
    images, labels = [], []
    for batch in batches:
        images.append(batch["image"].numpy())
        labels.append(batch["label"].numpy())
    x, y = np.concatenate(images), np.concatenate(labels).astype(int)

    def scores(shifted: np.ndarray) -> np.ndarray:
        return model.predict(shifted, batch_size=64, verbose=0).reshape(-1)

    base = scores(x)
    threshold = card["operating_point"]["threshold"]
    predicted = (base >= threshold).astype(int)
    figures: dict[str, Any] = {
        "test_images": int(y.size),
        "auroc": float(roc_auc_score(y, base)),
        "accuracy_at_operating_point": float((predicted == y).mean()),
        "sensitivity": float(predicted[y == 1].mean()),
        "specificity": float(1 - predicted[y == 0].mean()),
        "threshold": threshold,
        "shifted_auroc": {},
    }
    for name, (_, shift) in shifts.ROBUSTNESS_SHIFTS.items():
        shifted = np.concatenate(
            [shift(tf.constant(x[i : i + 256])).numpy() for i in range(0, len(x), 256)]
        )
        figures["shifted_auroc"][name] = float(roc_auc_score(y, scores(shifted)))
    figures["worst_shifted_auroc"] = min(figures["shifted_auroc"].values())
    return figures


def table(report: dict[str, Any]) -> str:
    names = list(next(iter(report["variants"].values()))["shifted_auroc"])
    head = (
        "| variant | wall (min) | whole path (min) | test AUROC | acc. at op. point "
        "| sens / spec | worst shift |"
    )
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in report["variants"].items():
        path = f"{v['path_wall_s'] / 60:.1f}" if v.get("path_wall_s") else "n/a"
        lines.append(
            f"| {name} | {v['wall_s'] / 60:.1f} | {path} | {v['auroc']:.3f} | "
            f"{v['accuracy_at_operating_point']:.3f} | {v['sensitivity']:.2f} / "
            f"{v['specificity']:.2f} | {v['worst_shifted_auroc']:.3f} |"
        )
    lines += ["", "| variant | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    for name, v in report["variants"].items():
        cells = " | ".join(f"{v['shifted_auroc'][n]:.3f}" for n in names)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=sorted(DATA), default="kermany")
    parser.add_argument("--data_root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/recipe_ablation"))
    parser.add_argument("--holdout", choices=HOLDOUTS, default="patients")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="Epoch budget for every variant (default: each "
        "variant's own, so 'default' is exactly what a user gets).",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    preprocessed = prepare(args.data, args.workdir, args.data_root, args.holdout)
    timed = preprocessed.with_suffix(".seconds")
    preprocess_s = float(timed.read_text()) if timed.exists() else None  # older caches
    report: dict[str, Any] = {
        "data": args.data,
        "holdout": args.holdout,
        "epochs": args.epochs,
        "command": " ".join(sys.argv),
        "variants": {},
    }
    for name in args.variants.split(","):
        results = args.workdir / args.data / "results" / args.holdout / name
        flags = VARIANTS[name]
        if args.epochs is not None:
            flags = [*flags, "--epochs", str(args.epochs)]
        command = [
            str(BIN / "xray-train"),
            "--data_dir", str(preprocessed),
            "--output_dir", str(results),
            "--verbose", "2",
            *flags,
        ]  # fmt: skip
        wall = _run(command, args.workdir / args.data / f"train_{args.holdout}_{name}.log")
        scored = score_test_images(
            results,
            preprocessed,
            args.workdir / args.data / "archive",
            results.parent / f"{name}_scored",
        )
        report["variants"][name] = {
            "flags": flags,
            "wall_s": wall,
            # preprocess -> train -> score the test images with xray-score
            "path_wall_s": preprocess_s and preprocess_s + wall + scored["score_wall_s"],
            **scored,
            **evaluate(results, preprocessed),
        }
        print(json.dumps({name: report["variants"][name]}), file=sys.stderr, flush=True)
    (args.workdir / f"table_{args.data}_{args.holdout}.md").write_text(table(report))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
