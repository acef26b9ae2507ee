"""Training recipe ablation and robustness check on real chest X-rays; prints JSON.

``.venv/bin/python benchmarks/recipe_ablation.py [--data kermany|nih] [--epochs 6]
[--variants baseline,shift_aug,...] [--workdir /tmp/recipe_ablation]``

1. Imports the labelled set from ``../shared/data`` with ``xray-import`` and
   preprocesses it with ``xray-preprocess --split 0.7,0.15,0.15`` (patients
   never cross splits; cached under ``--workdir``).
2. Trains each recipe variant with ``xray-train`` (one subprocess each, the
   same epoch budget and seed), timing the wall clock.
3. Scores the held-out test patients with the exported model: AUROC, and
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
import json
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
}  # fmt: skip

DATA = {"kermany": "cxr_kermany_pediatric_train", "nih": "cxr_nih_pneumonia_dev"}


def _run(command: list[str], log: Path) -> float:
    started = time.monotonic()
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed (exit {done.returncode}); see {log}")
    return time.monotonic() - started


def prepare(data: str, workdir: Path, data_root: Path) -> Path:
    """Imports and preprocesses the data set once; returns the preprocessed folder."""
    archive, preprocessed = workdir / data / "archive", workdir / data / "preprocessed"
    (workdir / data).mkdir(parents=True, exist_ok=True)
    if not (archive / "metadata.csv").exists():
        labels = data_root / DATA[data] / "labels.csv"
        _run(
            [str(BIN / "xray-import"), "--labels_csv", str(labels), "--output_dir", str(archive)],
            workdir / data / "import.log",
        )
    if not (preprocessed / "commit.json").exists():
        _run(
            [
                str(BIN / "xray-preprocess"),
                "--metadata", str(archive / "metadata.csv"),
                "--output_dir", str(preprocessed),
                "--split", "0.7,0.15,0.15",
                "--seed", "0",
            ],
            workdir / data / "preprocess.log",
        )  # fmt: skip
    return preprocessed


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
    head = "| variant | wall (min) | test AUROC | acc. at op. point | sens / spec | worst shift |"
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    for name, v in report["variants"].items():
        lines.append(
            f"| {name} | {v['wall_s'] / 60:.1f} | {v['auroc']:.3f} | "
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
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    preprocessed = prepare(args.data, args.workdir, args.data_root)
    report: dict[str, Any] = {
        "data": args.data,
        "epochs": args.epochs,
        "command": " ".join(sys.argv),
        "variants": {},
    }
    for name in args.variants.split(","):
        results = args.workdir / args.data / "results" / name
        flags = VARIANTS[name]
        command = [
            str(BIN / "xray-train"),
            "--data_dir", str(preprocessed),
            "--output_dir", str(results),
            "--epochs", str(args.epochs),
            "--verbose", "2",
            *flags,
        ]  # fmt: skip
        wall = _run(command, args.workdir / args.data / f"train_{name}.log")
        report["variants"][name] = {
            "flags": flags,
            "wall_s": wall,
            **evaluate(results, preprocessed),
        }
        print(json.dumps({name: report["variants"][name]}), file=sys.stderr, flush=True)
    (args.workdir / "table.md").write_text(table(report))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
