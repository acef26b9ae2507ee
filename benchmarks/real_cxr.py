"""Real chest X-rays end to end: import, preprocess, train, score and analyse.

What it runs, per labelled data set under ``--data_root`` (default
``../shared/data`` relative to the repository root; nothing is downloaded):

* ``nih``: the NIH ChestX-ray8 pneumonia dev set (400 adult PNGs, 278
  patients; pneumonia vs. "No Finding");
* ``kermany``: the training split of Kermany et al.'s paediatric pneumonia
  set (5,216 JPEGs; patient IDs from its ``labels.csv``).

Each data set goes through the project's own console scripts, one subprocess
per stage, exactly as a user would run them (the commands are in the JSON):

1. ``xray-import --labels_csv DATA/labels.csv`` -> a DICOM archive and
   ``metadata.csv`` (patient IDs from the CSV);
2. ``xray-preprocess --split 0.7,0.15,0.15 --seed 0`` -> patient-level,
   label-stratified train/validation/test shards;
3. per model (``simple_cnn``, ``densenet121``; trained from scratch, no
   pretrained weights): ``xray-train`` with a per-model epoch budget and an
   optional per-model cap on steps per epoch (the CPU budget; a cap never
   exceeds one pass over the training split);
4. ``xray-score --data_dir`` over every split's shards (by default for the
   simple CNN only: the trainer already wrote its validation and test
   predictions; this demonstrates the batch scorer and checks that it
   reproduces the trainer's test scores);
5. ``xray-analyze`` on the trainer's validation and test predictions: the
   threshold (Youden's J) is chosen on validation and applied to test; 95%
   CIs from ``--bootstrap`` resamples of test *patients*.

Separately, the real DICOM corpus (``dicom_corpus/``, 225 public test files
of many kinds) is run through ``xray-preprocess``: the script writes a
``metadata.csv`` over every file in it except its ``manifest.csv``
(``DicomPath`` relative to the corpus, ``PatientID`` = that relative path, so
one pseudo-patient per file, and ``Abnormal=false`` as a placeholder: the
corpus is unlabelled, so its splits and label counts mean nothing) and reports
kept and rejected files by reason, cross-checked against the corpus manifest.

Outputs under ``--workdir`` (default ``/tmp/real_cxr``)::

    <dataset>/archive/ preprocessed/ <model>/{results,scores,analysis}/
    <dataset>/logs/<stage>.log       each stage's stdout and stderr
    <dataset>/stages/<stage>.json    finished-stage markers (the cache)
    dicom_corpus/{metadata.csv,preprocessed/,logs/,stages/}
    summary.json, table.md

Caching: a stage is skipped when its marker records the same fingerprint
(its command, the digest of any input file the script generated, and the
fingerprints of the stages it depends on), so a rerun only does what is new
or changed; ``--force`` reruns everything. The fingerprint does not cover
the project's code: after changing a job, pass ``--force`` or delete the
stage's marker. A training run that was killed resumes from its Keras
backup when rerun with the same settings.

The Markdown written to ``--table_out`` (default ``<workdir>/table.md``) is
meant to be pasted verbatim into the README: per data set and model, images
and patients per split, the training budget actually used, test AUC with its
95% CI, sensitivity and specificity, next to the published anchors (which
are not like-for-like: see the notes the table carries), then the corpus
accounting.

Run from the repository root::

    .venv/bin/python benchmarks/real_cxr.py --datasets nih --models simple_cnn   # ~4 min
    .venv/bin/python benchmarks/real_cxr.py   # everything, the README's budgets

``--epochs`` and ``--steps_per_epoch`` take ``MODEL=N`` or
``MODEL@DATASET=N`` items (the dataset-specific one wins). On an idle 2-core
CPU DenseNet-121 trains at about 4-5 images/s at batch 32 after ~60 s of
tracing, and the simple CNN at about 180 images/s; on a shared machine
expect a half to a quarter of that. Budget per DenseNet-121 run: epochs x
steps x 32 / (images/s), plus one validation pass per epoch and a final
prediction pass over validation and test at inference speed (a few times
the training rate), plus ~2 min of start-up, tracing and export. Kermany's
training split (3,602 images at 0.7) takes about 13 min per full DenseNet-121
epoch on an idle machine, so its default budget is capped: 2 epochs of 20
steps (1,280 images), about 11 min of wall time here. The defaults are
``--epochs simple_cnn=20,simple_cnn@kermany=6,densenet121=4,densenet121@kermany=2
--steps_per_epoch densenet121=20``.

The result is one JSON document on stdout; progress is logged to stderr.
The exit status is 1 when any stage failed (its error is in the JSON).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
MODELS = ("simple_cnn", "densenet121")
CORPUS_FOLDER = "dicom_corpus"
#: Files in the corpus folder that are not part of the corpus itself.
CORPUS_NON_DICOM = ("manifest.csv",)
#: The budgets of the README's figures (see the module docstring for the arithmetic).
DEFAULT_EPOCHS = "simple_cnn=20,simple_cnn@kermany=6,densenet121=4,densenet121@kermany=2"
DEFAULT_STEPS = "densenet121=20"
#: Bump when a stage's outputs change meaning, so cached stages rerun.
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Dataset:
    """A labelled data set under --data_root and the published figure it is shown next to."""

    key: str
    folder: str
    title: str
    anchor_auc: float
    anchor_short: str
    anchor: str


DATASETS: dict[str, Dataset] = {
    "nih": Dataset(
        key="nih",
        folder="cxr_nih_pneumonia_dev",
        title="NIH ChestX-ray8 pneumonia dev set (adults; pneumonia vs. No Finding)",
        anchor_auc=0.768,
        anchor_short="CheXNet",
        anchor=(
            "CheXNet (Rajpurkar et al. 2017): pneumonia AUROC 0.768 on NIH ChestX-ray14, "
            "DenseNet-121 initialised from ImageNet, ~100k training images, pneumonia vs. "
            "every other image (14-label task)"
        ),
    ),
    "kermany": Dataset(
        key="kermany",
        folder="cxr_kermany_pediatric_train",
        title="Kermany et al. paediatric pneumonia, training split (pneumonia vs. normal)",
        anchor_auc=0.968,
        anchor_short="Kermany et al. 2018",
        anchor=(
            "Kermany et al. 2018 (Cell): AUROC 0.968 (accuracy 92.8%) on their own 624-image "
            "test set, ImageNet-pretrained Inception V3 (transfer learning) trained on the "
            "5,232-image training set"
        ),
    ),
}


class StageError(RuntimeError):
    """A stage's subprocess failed or ran out of time."""

    def __init__(self, stage: str, detail: str, log: Path) -> None:
        super().__init__(f"{stage}: {detail} (log: {log})")
        self.stage = stage
        self.detail = detail
        self.log = log


# --------------------------------------------------------------------------
# Arguments


def _model_budget(text: str) -> dict[str, int]:
    """Parses ``simple_cnn=20,densenet121@kermany=3`` into {key: N}."""
    budget: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        model, _, dataset = key.strip().partition("@")
        if not sep or model not in MODELS or (dataset and dataset not in DATASETS):
            raise argparse.ArgumentTypeError(
                f"expected MODEL=N or MODEL@DATASET=N with MODEL in {MODELS} and DATASET in "
                f"{tuple(DATASETS)}; got {item!r}"
            )
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer in {item!r}") from None
        if number < 0:
            raise argparse.ArgumentTypeError(f"negative value in {item!r}")
        budget[key.strip()] = number
    return budget


def _names(choices: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"expected a list from {tuple(choices)}; got {text!r}")
        return list(dict.fromkeys(names))

    return parse


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--data_root",
        type=Path,
        default=DEFAULT_DATA_ROOT,
        help=f"folder holding the data sets and {CORPUS_FOLDER}/ (default: {DEFAULT_DATA_ROOT})",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/real_cxr"),
        help="outputs and the stage cache (default /tmp/real_cxr)",
    )
    parser.add_argument(
        "--datasets",
        type=_names(tuple(DATASETS)),
        default=list(DATASETS),
        help="comma-separated from nih,kermany (default both)",
    )
    parser.add_argument(
        "--models",
        type=_names(MODELS),
        default=list(MODELS),
        help="comma-separated from simple_cnn,densenet121 (default both)",
    )
    parser.add_argument(
        "--epochs",
        type=_model_budget,
        default=_model_budget(DEFAULT_EPOCHS),
        help=f"maximum epochs, MODEL[@DATASET]=N items (default {DEFAULT_EPOCHS}; "
        "unlisted models get 10); early stopping may end sooner",
    )
    parser.add_argument(
        "--steps_per_epoch",
        type=_model_budget,
        default=_model_budget(DEFAULT_STEPS),
        help=f"cap on training steps per epoch, MODEL[@DATASET]=N items (default {DEFAULT_STEPS};"
        " 0 or unlisted: one full pass over the training split)",
    )
    parser.add_argument(
        "--max_minutes_per_run",
        type=float,
        default=0.0,
        help="hard wall-clock limit per training run: a run past it is killed and reported as "
        "failed (0: none; the budget itself is set with --epochs/--steps_per_epoch; a killed "
        "run resumes from its backup when the script is rerun)",
    )
    parser.add_argument("--batch_size", type=int, default=32, help="global batch size (32)")
    parser.add_argument(
        "--patience", type=int, default=5, help="early-stopping patience in epochs (5)"
    )
    parser.add_argument(
        "--split", default="0.7,0.15,0.15", help="patient-level train,validation,test ratios"
    )
    parser.add_argument("--seed", type=int, default=0, help="split, training and bootstrap seed")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="patient bootstrap resamples for the 95%% CIs"
    )
    parser.add_argument(
        "--score_models",
        default="simple_cnn",
        help="models whose shards xray-score rescores (comma list, 'all' or 'none'; "
        "default simple_cnn)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=0,
        help="use at most N images per data set, balanced over labels in CSV order, and the "
        "first N corpus files in sorted order (0: all; for smoke tests)",
    )
    parser.add_argument("--skip_corpus", action="store_true", help="skip the DICOM corpus run")
    parser.add_argument(
        "--beam_args",
        default="",
        help="extra Beam options for xray-preprocess and xray-score, one shell-quoted string "
        "(default none: the jobs' own local runner on all cores)",
    )
    parser.add_argument(
        "--table_out", type=Path, default=None, help="Markdown table (default <workdir>/table.md)"
    )
    parser.add_argument("--force", action="store_true", help="ignore the cache, rerun every stage")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.patience < 1 or args.bootstrap < 0 or args.limit < 0:
        parser.error("--batch_size and --patience must be >= 1, --bootstrap and --limit >= 0")
    if args.max_minutes_per_run < 0:
        parser.error("--max_minutes_per_run must be >= 0")
    try:
        ratios = [float(v) for v in args.split.split(",")]
    except ValueError:
        parser.error(f"--split must be three numbers, got {args.split!r}")
    if len(ratios) != 3 or min(ratios) <= 0 or abs(sum(ratios) - 1.0) > 1e-6:
        parser.error("--split needs three positive ratios summing to 1 (a test split is needed)")
    text = args.score_models.strip().lower()
    if text in ("all", "none"):
        args.score_models = list(MODELS) if text == "all" else []
    else:
        try:
            args.score_models = _names(MODELS)(text)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--score_models: {exc}")
    args.beam_args = shlex.split(args.beam_args)
    args.workdir = args.workdir.resolve()
    args.data_root = args.data_root.resolve()
    args.table_out = (args.table_out or args.workdir / "table.md").resolve()
    return args


def _budget_for(budget: dict[str, int], model: str, dataset: str, default: int) -> int:
    return budget.get(f"{model}@{dataset}", budget.get(model, default))


# --------------------------------------------------------------------------
# Stages


def _script(name: str) -> list[str]:
    """A console script of this environment (``.venv/bin/xray-…``)."""
    path = Path(sys.executable).parent / name
    if path.is_file():
        return [str(path)]
    modules = {
        "xray-import": "archive_tools.import_images",
        "xray-preprocess": "beam_pipelines.preprocess",
        "xray-train": "trainer.train",
        "xray-score": "beam_pipelines.score",
        "xray-analyze": "analysis.analyze",
    }
    return [sys.executable, "-m", modules[name]]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Stage:
    """One subprocess stage: its command, where it logs, and how it is cached."""

    name: str
    command: list[str]
    home: Path  # <workdir>/<dataset>: holds logs/ and stages/
    depends: tuple[str, ...] = ()  # fingerprints of upstream stages
    inputs: tuple[str, ...] = ()  # digests of files this script generated for it
    clean_dir: Path | None = None  # removed first unless resuming the same run
    timeout_s: float | None = None

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(
            [_CACHE_VERSION, self.command, list(self.depends), list(self.inputs)], sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def marker(self) -> Path:
        return self.home / "stages" / f"{self.name}.json"

    @property
    def pending(self) -> Path:
        return self.home / "stages" / f"{self.name}.pending.json"

    @property
    def log(self) -> Path:
        return self.home / "logs" / f"{self.name}.log"


def run_stage(stage: Stage, force: bool) -> dict[str, Any]:
    """Runs a stage's command unless its marker says it already ran with this fingerprint.

    Returns:
        ``command`` (shell-quoted), ``fingerprint``, ``seconds`` (of the run that
        produced the outputs), ``cached`` and ``log``.

    Raises:
        StageError: when the command exits non-zero or exceeds its time limit.
    """
    fingerprint = stage.fingerprint
    if not force and stage.marker.is_file():
        marker = json.loads(stage.marker.read_text())
        if marker.get("fingerprint") == fingerprint:
            logger.info("%s: cached (%.0f s when it ran)", stage.name, marker["seconds"])
            return {**marker, "cached": True}
    stage.marker.unlink(missing_ok=True)
    stage.marker.parent.mkdir(parents=True, exist_ok=True)
    stage.log.parent.mkdir(parents=True, exist_ok=True)
    if stage.clean_dir is not None and stage.clean_dir.exists():
        resuming = (
            stage.pending.is_file()
            and json.loads(stage.pending.read_text()).get("fingerprint") == fingerprint
        )
        if resuming and not force:
            logger.info("%s: resuming an interrupted run in %s", stage.name, stage.clean_dir)
        else:
            shutil.rmtree(stage.clean_dir)
    stage.pending.write_text(json.dumps({"fingerprint": fingerprint}))
    shown = shlex.join(stage.command)
    logger.info("%s: %s", stage.name, shown)
    started = time.perf_counter()
    with stage.log.open("w") as log:
        log.write(f"$ {shown}\n")
        log.flush()
        # Own session, so a timeout can stop the whole process group we started.
        child = subprocess.Popen(
            stage.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        try:
            code = child.wait(timeout=stage.timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(child)
            raise StageError(
                stage.name, f"killed after the {stage.timeout_s:.0f} s limit", stage.log
            ) from None
    seconds = time.perf_counter() - started
    if code != 0:
        tail = stage.log.read_text(errors="replace").strip().splitlines()[-5:]
        raise StageError(stage.name, f"exit status {code}: {' | '.join(tail)}", stage.log)
    marker = {
        "stage": stage.name,
        "command": shown,
        "fingerprint": fingerprint,
        "seconds": round(seconds, 1),
        "log": str(stage.log),
    }
    stage.marker.write_text(json.dumps(marker, indent=2) + "\n")
    stage.pending.unlink(missing_ok=True)
    logger.info("%s: done in %.0f s", stage.name, seconds)
    return {**marker, "cached": False}


def _stop_group(child: subprocess.Popen[Any]) -> None:
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 15.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------
# Inputs the script writes


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def balanced_subset(rows: Sequence[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """At most ``limit`` rows taken round-robin over labels, each label in CSV order.

    Rows keep their original order, so the subset is deterministic.
    """
    by_label: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_label.setdefault(row["label"].strip().lower(), []).append(index)
    queues = [iter(by_label[label]) for label in sorted(by_label)]
    chosen: list[int] = []
    while len(chosen) < limit and queues:
        for queue in list(queues):
            if len(chosen) >= limit:
                break
            index = next(queue, None)
            if index is None:
                queues.remove(queue)
            else:
                chosen.append(index)
    return [rows[i] for i in sorted(chosen)]


def corpus_files(corpus: Path, limit: int = 0) -> list[str]:
    """Every file in the corpus (relative POSIX paths, sorted) except its own manifest."""
    files = sorted(
        p.relative_to(corpus).as_posix()
        for p in corpus.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name not in CORPUS_NON_DICOM
    )
    return files[:limit] if limit else files


def write_corpus_metadata(corpus: Path, out: Path, limit: int = 0) -> int:
    """Writes metadata.csv over the corpus: one pseudo-patient per file, Abnormal=false.

    ``Abnormal=false`` is a placeholder (the corpus is unlabelled): the
    preprocessing job requires a label, and only the kept/rejected accounting
    of this run is reported.

    Returns:
        The number of rows.
    """
    from beam_pipelines.contracts.metadata import (
        ABNORMAL,
        COLUMNS,
        DICOM_PATH,
        PATIENT_ID,
        format_label,
    )

    rows = [
        {
            **dict.fromkeys(COLUMNS, ""),
            PATIENT_ID: rel,
            DICOM_PATH: rel,
            ABNORMAL: format_label(False),
        }
        for rel in corpus_files(corpus, limit)
    ]
    _write_csv(out, COLUMNS, rows)
    return len(rows)


# --------------------------------------------------------------------------
# Summaries read from each job's own output files


def _splits_patients(path: Path) -> dict[str, int]:
    _, rows = _read_csv(path)
    counts = Counter(row["split"] for row in rows)
    return {name: counts.get(name, 0) for name in ("train", "validation", "test")}


def _import_summary(archive: Path) -> dict[str, Any]:
    _, rows = _read_csv(archive / "metadata.csv")
    _, errors = _read_csv(archive / "import_errors.csv")
    return {
        "images": len(rows),
        "abnormal": sum(r["Abnormal"] == "true" for r in rows),
        "patients": len({r["PatientID"] for r in rows}),
        "unreadable": len(errors),
        "unreadable_by_reason": dict(sorted(Counter(e["reason"] for e in errors).items())),
    }


def _preprocess_summary(out: Path) -> dict[str, Any]:
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    return {
        "input_rows": manifest["input_rows"],
        "kept": manifest["kept"],
        "rejected": manifest["rejected"],
        "rejected_by_reason": manifest["rejected_by_reason"],
        "images": {name: sum(c.values()) for name, c in counts.items()},
        "counts": counts,
        "patients": _splits_patients(out / "splits.csv"),
        "train_pixel_stats": {k: manifest["train_pixel_stats"].get(k) for k in ("mean", "std")},
    }


def _duplicate_check(archive: Path, source: Path, pre: Path) -> dict[str, Any]:
    """Byte-identical source images, and whether any lands in two splits (a leak)."""
    _, rows = _read_csv(archive / "metadata.csv")
    _, assignment = _read_csv(pre / "splits.csv")
    split_of = {row["PatientID"]: row["split"] for row in assignment}
    groups: dict[str, list[str]] = {}
    for row in rows:
        digest = _file_digest(source / row["SourcePath"])
        groups.setdefault(digest, []).append(split_of.get(row["PatientID"], "rejected"))
    repeated = [splits for splits in groups.values() if len(splits) > 1]
    return {
        "groups": len(repeated),
        "images": sum(len(splits) for splits in repeated),
        "groups_across_splits": sum(len(set(splits)) > 1 for splits in repeated),
    }


def _score_check(scores_prefix: Path, trainer_test: Path) -> dict[str, Any]:
    """Compares the scorer's test-split scores with the trainer's own predictions."""
    import pandas as pd

    files = sorted(scores_prefix.parent.glob(f"{scores_prefix.name}-*-of-*.parquet"))
    scored = pd.concat(
        [pd.read_parquet(f, columns=["dicom_path", "split", "score"]) for f in files]
    )
    trainer = pd.read_parquet(trainer_test, columns=["dicom_path", "score"])
    joined = trainer.merge(
        scored[scored["split"] == "test"], on="dicom_path", suffixes=("_trainer", "_scorer")
    )
    diff = (joined["score_trainer"] - joined["score_scorer"]).abs()
    return {
        "scored_per_split": {
            str(k): int(v) for k, v in scored["split"].value_counts().sort_index().items()
        },
        "test_rows_trainer": int(len(trainer)),
        "test_rows_matched": int(len(joined)),
        "test_max_abs_score_diff": float(diff.max()) if len(diff) else None,
    }


def _analysis_summary(metrics_path: Path) -> dict[str, Any]:
    document = json.loads(metrics_path.read_text())
    headline = document["metrics"]
    ci = headline["ci95"]
    return {
        "split": document["split"],
        "level": document["level"],
        "n": headline["n"],
        "patients": headline["patients"],
        "positives": headline["positives"],
        "roc_auc": headline["roc_auc"],
        "roc_auc_ci95": ci.get("auc"),
        "average_precision": headline["average_precision"],
        "threshold": document["threshold"],
        "sensitivity": headline["sensitivity"],
        "sensitivity_ci95": ci.get("sensitivity"),
        "specificity": headline["specificity"],
        "specificity_ci95": ci.get("specificity"),
        "accuracy": headline["accuracy"],
        "bootstrap_replicates_used": ci.get("replicates_used"),
        "leakage_patients": document["leakage"]["patients_in_several_splits"],
        "warnings": document["warnings"],
        "report": str(metrics_path.parent / "report.html"),
    }


# --------------------------------------------------------------------------
# Pipelines


def _run_dataset(args: argparse.Namespace, dataset: Dataset) -> dict[str, Any]:
    source = args.data_root / dataset.folder
    labels = source / "labels.csv"
    if not labels.is_file():
        raise FileNotFoundError(f"{labels} not found (is --data_root {args.data_root} right?)")
    home = args.workdir / dataset.key
    home.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"title": dataset.title, "source": str(source), "models": {}}

    import_command = [*_script("xray-import")]
    inputs: tuple[str, ...] = ()
    if args.limit:
        fields, rows = _read_csv(labels)
        subset = home / f"labels_limit{args.limit}.csv"
        _write_csv(subset, fields, balanced_subset(rows, args.limit))
        import_command += ["--labels_csv", str(subset), "--images_root", str(source)]
        inputs = (_file_digest(subset),)
    else:
        import_command += ["--labels_csv", str(labels)]
    archive = home / "archive"
    import_command += ["--output_dir", str(archive), "--overwrite"]
    imported = run_stage(Stage("import", import_command, home, inputs=inputs), args.force)
    result["import"] = {**imported, **_import_summary(archive)}

    pre = home / "preprocessed"
    pre_command = [
        *_script("xray-preprocess"),
        "--metadata", str(archive / "metadata.csv"),
        "--output_dir", str(pre),
        "--split", args.split,
        "--seed", str(args.seed),
        *args.beam_args,
    ]  # fmt: skip
    preprocessed = run_stage(
        Stage("preprocess", pre_command, home, depends=(imported["fingerprint"],)), args.force
    )
    result["preprocess"] = {**preprocessed, **_preprocess_summary(pre)}
    result["duplicate_source_images"] = _duplicate_check(archive, source, pre)

    for model in args.models:
        try:
            result["models"][model] = _run_model(args, dataset, model, home, pre, preprocessed)
        except StageError as exc:
            logger.error("%s/%s failed: %s", dataset.key, model, exc)
            result["models"][model] = {"error": str(exc), "stage": exc.stage, "log": str(exc.log)}
    return result


def _run_model(
    args: argparse.Namespace,
    dataset: Dataset,
    model: str,
    home: Path,
    pre: Path,
    preprocessed: dict[str, Any],
) -> dict[str, Any]:
    manifest = json.loads((pre / "manifest.json").read_text())
    train_images = sum(manifest["counts"]["train"].values())
    full_pass = max(1, math.ceil(train_images / args.batch_size))
    epochs = _budget_for(args.epochs, model, dataset.key, 10)
    cap = _budget_for(args.steps_per_epoch, model, dataset.key, 0)
    steps = min(cap, full_pass) if cap else full_pass
    base = home / model
    results = base / "results"
    train_command = [
        *_script("xray-train"),
        "--data_dir", str(pre),
        "--output_dir", str(results),
        "--model", model,
        "--epochs", str(epochs),
        "--global_batch_size", str(args.batch_size),
        "--early_stopping_patience", str(args.patience),
        "--seed", str(args.seed),
        "--verbose", "2",
    ]  # fmt: skip
    if steps != full_pass:
        train_command += ["--steps_per_epoch", str(steps)]
    timeout = args.max_minutes_per_run * 60 or None
    trained = run_stage(
        Stage(
            f"train_{model}",
            train_command,
            home,
            depends=(preprocessed["fingerprint"],),
            clean_dir=results,
            timeout_s=timeout,
        ),
        args.force,
    )
    card = json.loads((results / "model_card.json").read_text())
    epochs_run = int(card["epochs_run"])
    record: dict[str, Any] = {
        "train": {
            **trained,
            "model_id": card["model_id"],
            "pretrained_weights": None,
            "epochs_max": epochs,
            "epochs_run": epochs_run,
            "steps_per_epoch": steps,
            "steps_full_pass": full_pass,
            "capped": steps < full_pass,
            "batch_size": args.batch_size,
            "train_images": train_images,
            "images_seen": epochs_run * steps * args.batch_size,
            "best_val_auc": card["best_val_auc"],
            "trainer_auc": card["auc"],
        }
    }

    if model in args.score_models:
        prefix = base / "scores" / "shards"
        score_command = [
            *_script("xray-score"),
            "--model", str(results / "model"),
            "--data_dir", str(pre),
            "--output", str(prefix),
            *args.beam_args,
        ]  # fmt: skip
        scored = run_stage(
            Stage(f"score_{model}", score_command, home, depends=(trained["fingerprint"],)),
            args.force,
        )
        summary = json.loads(Path(f"{prefix}.summary.json").read_text())
        record["score"] = {
            **scored,
            **{k: summary[k] for k in ("inputs", "scored", "rejected", "rejected_by_reason")},
            **_score_check(prefix, results / "predictions" / "test.parquet"),
        }

    analysis = base / "analysis"
    analyze_command = [
        *_script("xray-analyze"),
        "--predictions",
        str(results / "predictions" / "validation.parquet"),
        str(results / "predictions" / "test.parquet"),
        "--history", str(results / "history.csv"),
        "--manifest", str(pre / "manifest.json"),
        "--output_dir", str(analysis),
        "--split", "test",
        "--threshold", "youden",
        "--bootstrap", str(args.bootstrap),
        "--seed", str(args.seed),
    ]  # fmt: skip
    analyzed = run_stage(
        Stage(f"analyze_{model}", analyze_command, home, depends=(trained["fingerprint"],)),
        args.force,
    )
    record["analysis"] = {**analyzed, **_analysis_summary(analysis / "metrics.json")}
    return record


def _run_corpus(args: argparse.Namespace) -> dict[str, Any]:
    corpus = args.data_root / CORPUS_FOLDER
    if not corpus.is_dir():
        raise FileNotFoundError(f"{corpus} not found")
    home = args.workdir / CORPUS_FOLDER
    metadata = home / "metadata.csv"
    files = write_corpus_metadata(corpus, metadata, args.limit)
    out = home / "preprocessed"
    command = [
        *_script("xray-preprocess"),
        "--metadata", str(metadata),
        "--archive_root", str(corpus),
        "--output_dir", str(out),
        "--split", args.split,
        "--seed", str(args.seed),
        *args.beam_args,
    ]  # fmt: skip
    ran = run_stage(
        Stage("preprocess", command, home, inputs=(_file_digest(metadata),)), args.force
    )
    manifest = json.loads((out / "manifest.json").read_text())
    rejects = [
        json.loads(line)
        for line in (out / "rejects" / "rejects.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return {
        **ran,
        "corpus": str(corpus),
        "metadata": str(metadata),
        "label_placeholder": "Abnormal=false for every file (the corpus is unlabelled)",
        "patient_id": "the file's path relative to the corpus (one pseudo-patient per file)",
        "files": files,
        "input_rows": manifest["input_rows"],
        "kept": manifest["kept"],
        "rejected": manifest["rejected"],
        "rejected_by_reason": manifest["rejected_by_reason"],
        "rejected_by_stage": dict(sorted(Counter(r["stage"] for r in rejects).items())),
        "manifest_check": _corpus_manifest_check(corpus, rejects, files, args.limit),
    }


def _corpus_manifest_check(
    corpus: Path, rejects: list[dict[str, Any]], files: int, limit: int
) -> dict[str, Any]:
    """Kept/rejected against the corpus manifest's own decodability column."""
    path = corpus / "manifest.csv"
    if not path.is_file():
        return {"available": False}
    _, rows = _read_csv(path)
    included = set(corpus_files(corpus, limit))
    rejected = {r["dicom_path"] for r in rejects}
    grayscale_ok = {
        r["path"]
        for r in rows
        if r["path"] in included
        and r["decode_pydicom_pylibjpeg_gdcm"].startswith("ok")
        and r["photometric"] in ("MONOCHROME1", "MONOCHROME2")
    }
    failing = {
        r["path"]
        for r in rows
        if r["path"] in included and not r["decode_pydicom_pylibjpeg_gdcm"].startswith("ok")
    }
    return {
        "available": True,
        "files_in_manifest": len({r["path"] for r in rows} & included),
        "files_not_in_manifest": sorted(included - {r["path"] for r in rows}),
        "manifest_ok_grayscale": len(grayscale_ok),
        "manifest_ok_grayscale_kept": len(grayscale_ok - rejected),
        "manifest_ok_grayscale_rejected": sorted(grayscale_ok & rejected),
        "manifest_fail": len(failing),
        "manifest_fail_kept": sorted(failing - rejected),
    }


# --------------------------------------------------------------------------
# Report


def _machine() -> dict[str, Any]:
    def package(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity(0)) if affinity else os.cpu_count(),
        "gpu": False,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{name: package(name) for name in ("tensorflow", "keras", "apache-beam", "pydicom")},
    }


def _ci(interval: Sequence[float] | None) -> str:
    return f"{interval[0]:.3f}–{interval[1]:.3f}" if interval else "n/a"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def markdown_table(report: dict[str, Any]) -> str:
    """The README's real-data section body, generated from a report."""
    settings = report["settings"]
    machine = report["machine"]
    lines = [
        f"Generated by `benchmarks/real_cxr.py` on {machine['cpus_usable']} CPU cores, no GPU "
        f"(TensorFlow {machine['tensorflow']}); every model trained from scratch (no "
        "pretrained weights). Splits by patient, label-stratified, "
        f"{settings['split'].replace(',', '/')} train/validation/test, seed {settings['seed']}. "
        "Test AUC per image with a 95% CI from "
        f"{settings['bootstrap']} bootstrap resamples of test patients; sensitivity and "
        "specificity at the Youden threshold chosen on the validation split.",
        "",
        "| data set | model | images train / val / test (patients) | training budget "
        "(CPU) | test AUC (95% CI) | sensitivity / specificity | published anchor (not "
        "like-for-like) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, entry in report["datasets"].items():
        dataset = DATASETS[key]
        if "error" in entry and "preprocess" not in entry:
            lines.append(f"| {key} | – | failed: {entry['error']} | | | | |")
            continue
        pre = entry["preprocess"]
        images, patients = pre["images"], pre["patients"]
        counts = " / ".join(
            f"{images[s]:,} ({patients[s]:,})" for s in ("train", "validation", "test")
        )
        anchor = f"{dataset.anchor_auc:.3f} ({dataset.anchor_short})"
        for model, record in entry["models"].items():
            if "error" in record:
                lines.append(
                    f"| {key} | {model} | {counts} | failed in {record['stage']} | – | – | "
                    f"{anchor} |"
                )
                continue
            train, analysis = record["train"], record["analysis"]
            fraction = train["steps_per_epoch"] * train["batch_size"] / train["train_images"]
            per_epoch = (
                f"{train['steps_per_epoch']} steps (cap, {min(fraction, 1.0):.0%} of a pass)"
                if train["capped"]
                else f"{train['steps_per_epoch']} steps (full pass)"
            )
            stopped = ", early-stopped" if train["epochs_run"] < train["epochs_max"] else ""
            budget = (
                f"{train['epochs_run']} epochs (max {train['epochs_max']}{stopped}) × "
                f"{per_epoch} × batch {train['batch_size']} = {train['images_seen']:,} images; "
                f"{_minutes(train['seconds'])} wall"
            )
            auc = f"**{analysis['roc_auc']:.3f}** ({_ci(analysis['roc_auc_ci95'])})"
            rates = f"{analysis['sensitivity']:.2f} / {analysis['specificity']:.2f}"
            lines.append(f"| {key} | {model} | {counts} | {budget} | {auc} | {rates} | {anchor} |")
    lines += [
        "",
        "Anchors: "
        + "; ".join(f"{d.anchor}" for key, d in DATASETS.items() if key in report["datasets"])
        + ". Our test sets are the held-out patients of our own split of much smaller data, "
        "not the published test sets (Kermany et al.'s test set is not in `../shared/data`), "
        'and our NIH task is pneumonia against "No Finding" only, so the anchors show the '
        "scale of what pretrained, GPU-trained models reach, not a like-for-like comparison. "
        "Wall times include TensorFlow start-up, graph tracing, per-epoch validation, export "
        "and prediction; the machine was shared with other jobs.",
    ]
    for key, entry in report["datasets"].items():
        duplicates = entry.get("duplicate_source_images")
        if duplicates and duplicates["groups"]:
            lines[-1] += (
                f" {key}: {duplicates['groups']} group(s) of byte-identical source images "
                f"({duplicates['images']} images), {duplicates['groups_across_splits']} of them "
                "spread over more than one split."
            )
    scored = [
        (key, model, record["score"])
        for key, entry in report["datasets"].items()
        for model, record in entry.get("models", {}).items()
        if "score" in record
    ]
    if scored:
        lines += ["", "Batch scoring of every split's shards with `xray-score --data_dir`:", ""]
        lines += [
            "| data set | model | images scored | rejected | wall | max test-score difference "
            "from the trainer's predictions |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for key, model, score in scored:
            diff = score["test_max_abs_score_diff"]
            lines.append(
                f"| {key} | {model} | {score['scored']:,} of {score['inputs']:,} | "
                f"{score['rejected']} | {_minutes(score['seconds'])} | "
                f"{'n/a' if diff is None else f'{diff:.1e}'} |"
            )
    corpus = report.get("dicom_corpus")
    if corpus and "error" not in corpus:
        check = corpus["manifest_check"]
        lines += [
            "",
            f"Real DICOM corpus (`../shared/data/{CORPUS_FOLDER}`, {corpus['files']} files, "
            f"unlabelled: `Abnormal=false` is a placeholder, one pseudo-patient per file) "
            f"through `xray-preprocess`: **{corpus['kept']} kept, {corpus['rejected']} "
            f"rejected** ({_minutes(corpus['seconds'])} wall).",
        ]
        if check.get("available"):
            lines[-1] += (
                f" Of the {check['manifest_ok_grayscale']} grayscale files the corpus manifest "
                f"marks decodable, {check['manifest_ok_grayscale_kept']} were kept; "
                f"{len(check['manifest_fail_kept'])} file(s) it marks undecodable were decoded "
                "and kept"
                + (
                    f" ({', '.join(f'`{p}`' for p in check['manifest_fail_kept'])})"
                    if check["manifest_fail_kept"]
                    else ""
                )
                + "."
            )
        lines += ["", "| reject reason | files |", "| --- | --- |"]
        lines += [
            f"| `{reason}` | {count} |" for reason, count in corpus["rejected_by_reason"].items()
        ]
    elif corpus:
        lines += ["", f"DICOM corpus run failed: {corpus['error']}"]
    return "\n".join(lines) + "\n"


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs (or reuses) every stage and returns the report.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The JSON-ready report: settings, machine, per data set the import,
        preprocessing and per-model training/scoring/analysis summaries, the
        DICOM corpus accounting, errors, and where the table was written.
    """
    args = _parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "settings": {
            "data_root": str(args.data_root),
            "workdir": str(args.workdir),
            "datasets": args.datasets,
            "models": args.models,
            "epochs": args.epochs,
            "steps_per_epoch_cap": args.steps_per_epoch,
            "max_minutes_per_run": args.max_minutes_per_run,
            "batch_size": args.batch_size,
            "early_stopping_patience": args.patience,
            "split": args.split,
            "seed": args.seed,
            "bootstrap": args.bootstrap,
            "score_models": args.score_models,
            "limit": args.limit,
            "beam_args": args.beam_args,
            "pretrained_weights": False,
        },
        "machine": _machine(),
        "anchors": {key: {"auc": d.anchor_auc, "source": d.anchor} for key, d in DATASETS.items()},
        "datasets": {},
        "dicom_corpus": None,
        "errors": [],
    }
    for key in args.datasets:
        try:
            report["datasets"][key] = _run_dataset(args, DATASETS[key])
        except (StageError, FileNotFoundError) as exc:
            logger.error("%s failed: %s", key, exc)
            report["datasets"][key] = {"error": str(exc)}
    if not args.skip_corpus:
        try:
            report["dicom_corpus"] = _run_corpus(args)
        except (StageError, FileNotFoundError) as exc:
            logger.error("DICOM corpus failed: %s", exc)
            report["dicom_corpus"] = {"error": str(exc)}
    for key, entry in report["datasets"].items():
        if "error" in entry:
            report["errors"].append(f"{key}: {entry['error']}")
        for model, record in entry.get("models", {}).items():
            if "error" in record:
                report["errors"].append(f"{key}/{model}: {record['error']}")
    if report["dicom_corpus"] and "error" in report["dicom_corpus"]:
        report["errors"].append(f"dicom_corpus: {report['dicom_corpus']['error']}")
    report["seconds_total"] = round(time.perf_counter() - started, 1)
    args.table_out.parent.mkdir(parents=True, exist_ok=True)
    args.table_out.write_text(markdown_table(report))
    report["table_markdown"] = str(args.table_out)
    (args.workdir / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: prints the report as JSON on stdout; exit 1 if a stage failed."""
    # force: an import that logged through the root logger before this point would
    # have installed a WARNING-level handler that hides this script's progress.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    report = run(argv)
    print(json.dumps(report, indent=2))
    if report["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
