"""Training configuration: defaults < config file (YAML/JSON) < command-line flags.

The resolved configuration is written next to the outputs (``config.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

MODELS = ("simple_cnn", "densenet121", "resnet50", "efficientnetb0")
SCHEDULES = ("plateau", "cosine")
OPTIMIZERS = ("adam", "adamw")
CLASS_WEIGHTS = ("manifest", "none")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on."""

    data_dir: str
    output_dir: str
    model: str = "simple_cnn"
    epochs: int = 10
    global_batch_size: int = 32
    learning_rate: float = 1e-3
    lr_schedule: str = "plateau"
    early_stopping_patience: int = 5
    class_weights: str = "manifest"
    augment: bool = True
    flip: bool = False
    rotation_degrees: float = 5.0
    shift_fraction: float = 0.05
    zoom_fraction: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1
    # Acquisition shifts: off by default. benchmarks/recipe_ablation.py measured
    # them raising the AUROC under shifts but lowering the held-out AUROC
    # (README, Benchmarks), and the synthetic finding is learnt more slowly.
    gamma: float = 0.0
    blur_sigma: float = 0.0
    resolution_jitter: float = 0.0
    noise_std: float = 0.0
    label_smoothing: float = 0.0
    optimizer: str = "adam"
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    ensemble: int = 1
    weights: str = "none"
    init_model: str | None = None
    freeze_epochs: int = 0
    shuffle_buffer: int = 1024
    cache: bool = False
    steps_per_epoch: int | None = None
    # Small data sets: 10 epochs of one pass over 300 images are 100 steps,
    # far too few (NIH dev set, held-out patients: AUROC 0.86 -> 0.93 with
    # 100-step epochs; README, Benchmarks). Large ones pass once, as before.
    min_steps_per_epoch: int = 100
    logical_cpus: int = 0
    mixed_precision: bool = False
    xla: bool = False
    seed: int = 0
    deterministic: bool = False
    operating_point: str = "youden"
    verbose: int = 2

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, not {self.model!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, not {self.lr_schedule!r}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"class_weights must be one of {CLASS_WEIGHTS}")
        if self.min_steps_per_epoch < 0:
            raise ValueError(f"min_steps_per_epoch must be >= 0, got {self.min_steps_per_epoch}")
        for name in ("epochs", "global_batch_size", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.logical_cpus < 0:
            raise ValueError("logical_cpus must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        for name in ("gamma", "blur_sigma", "noise_std", "weight_decay", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.resolution_jitter < 1 or not 0 <= self.label_smoothing < 0.5:
            raise ValueError("resolution_jitter must be in [0, 1) and label_smoothing in [0, 0.5)")
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {self.ensemble}")
        if self.weights != "none" and self.model == "simple_cnn":
            raise ValueError("weights: pretrained weights need a keras.applications --model")
        if self.init_model and (self.weights != "none" or self.ensemble > 1):
            raise ValueError("init_model fine-tunes one model: not with --weights or --ensemble")
        if not 0 <= self.freeze_epochs < self.epochs:
            raise ValueError(f"freeze_epochs must be in [0, epochs), got {self.freeze_epochs}")
        from beam_pipelines.contracts.operating_point import check_rule

        object.__setattr__(self, "operating_point", check_rule(self.operating_point))

    def to_json(self) -> str:
        """The resolved configuration as JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


_HELP = {
    "data_dir": "Preprocessed output (train/ and validation/ shards, manifest.json); any TF path.",
    "output_dir": "Where the model, history, config and predictions go.",
    "model": f"Architecture: {', '.join(MODELS)}.",
    "epochs": "Maximum epochs (early stopping may end sooner).",
    "global_batch_size": "Batch size across all replicas.",
    "learning_rate": "Initial learning rate (Adam).",
    "lr_schedule": "plateau (ReduceLROnPlateau on validation AUC) or cosine decay.",
    "early_stopping_patience": "Epochs without validation-AUC gain before stopping.",
    "class_weights": "manifest: weight classes by the training counts; none.",
    "augment": "Train-time augmentation (rotation, shift, zoom, brightness, contrast).",
    "flip": "Also flip left-right (off: chest anatomy is not symmetric).",
    "rotation_degrees": "Largest random rotation.",
    "shift_fraction": "Largest random shift, as a fraction of the side.",
    "zoom_fraction": "Largest random zoom in or out.",
    "brightness": "Largest random brightness change (images are in [0,1]).",
    "contrast": "Largest random contrast factor change.",
    "gamma": "Random gamma (detector response) of up to exp(+-log1p(G)); 0: off.",
    "blur_sigma": "Random Gaussian blur of up to this sigma in pixels (half the batches); 0: off.",
    "resolution_jitter": "Random down-and-up sampling to as little as 1-J of the resolution "
    "(half the batches); 0: off.",
    "noise_std": "Random Gaussian noise of up to this standard deviation; 0: off.",
    "label_smoothing": "Label smoothing of the binary cross-entropy (0: off).",
    "optimizer": "adam or adamw (decoupled weight decay, --weight_decay).",
    "weight_decay": "AdamW's decoupled weight decay.",
    "warmup_epochs": "Epochs of linear learning-rate warm-up before the schedule.",
    "ensemble": "Train K members with seeds seed..seed+K-1 and export one model averaging them.",
    "weights": "Backbone start: none (random), imagenet (downloaded into the Keras cache), or a "
    "weights file of the backbone (keras.applications models only).",
    "init_model": "A trained RESULTS/model folder to fine-tune on these shards (a new site).",
    "freeze_epochs": "Train only the output layer for the first N epochs (with --weights or "
    "--init_model; use a lower --learning_rate for the rest).",
    "shuffle_buffer": "Records in the shuffle buffer.",
    "cache": "Cache decoded records in memory after the first epoch (data that fits).",
    "steps_per_epoch": "Batches per epoch (default: one pass over the data, at least "
    "--min_steps_per_epoch).",
    "min_steps_per_epoch": "An epoch is at least this many batches: small data sets pass over "
    "their images several times between validations (0: one pass).",
    "logical_cpus": "Split the CPU into N logical devices (N replicas without GPUs).",
    "mixed_precision": "mixed_float16 compute (GPUs).",
    "xla": "Compile the model with XLA (jit_compile).",
    "seed": "Random seed for shuffling, augmentation and initialization.",
    "deterministic": "Deterministic ops (slower; same results for the same seed).",
    "operating_point": "How the model's threshold is chosen on the validation split at the end "
    "(youden | sens=0.90 | spec=0.90 | ppv=0.80); stored in model_card.json and the model folder.",
    "verbose": "Keras progress output: 0 silent, 1 bar, 2 one line per epoch.",
}


def build_parser() -> argparse.ArgumentParser:
    """Flags for every config field; unset flags do not override the config file."""
    parser = argparse.ArgumentParser(
        prog="xray-train",
        description="Train a normal/abnormal CNN on preprocessed TFRecord shards.",
    )
    parser.add_argument("--config", help="YAML or JSON file with any of the fields below.")
    for field in dataclasses.fields(TrainConfig):
        kind: Any = field.type
        if kind in ("bool", bool):
            convert: Any = _bool
        elif kind in ("int", int, "int | None"):
            convert = int
        elif kind in ("float", float):
            convert = float
        else:
            convert = str
        default = field.default if field.default is not dataclasses.MISSING else "required"
        parser.add_argument(
            f"--{field.name}",
            type=convert,
            default=None,
            help=f"{_HELP[field.name]} (default: {default})",
        )
    return parser


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Resolves the configuration from defaults, a config file and flags.

    Raises:
        SystemExit: (via argparse) for bad flags, a bad file or invalid values.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values.update(_read_file(parser, args.config))
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    for required in ("data_dir", "output_dir"):
        if not values.get(required):
            parser.error(f"--{required} is required (flag or config file)")
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    raise AssertionError("unreachable")


def _read_file(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        parser.error(f"cannot read --config {path}: {exc}")
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict):
        parser.error(f"--config {path} must hold a mapping of field: value")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        parser.error(f"--config {path} has unknown fields {unknown}")
    return data
