"""xray-synth: writes a realistic synthetic chest X-ray DICOM archive of any size.

Output (``DIR`` = ``--output_dir``)::

    DIR/raw/<PatientID>/<StudyID>_<n>.dcm   one DICOM file per image
    DIR/metadata.csv                        beam_pipelines.contracts.metadata.COLUMNS, patient order
    DIR/synth_images.csv                    per-image ground truth (encoding, pixel format)
    DIR/expected_rejects.csv                the --broken rows and the reason each must get
    DIR/../outside_<k>.dcm                  only with --broken >= 6 (path_escapes_root)

StudyIDs are numbered per patient (S0001, S0002, ...) as in real archives;
(PatientID, StudyID) and StudyInstanceUID are unique. Everything is
deterministic for a seed and independent of ``--workers``: each patient draws
from its own random stream, ``SeedSequence(seed, spawn_key=(0, index))``.

``expected_rejects.csv`` columns: ``row`` (1-based number of the data row in
metadata.csv, header not counted; the file line is ``row + 1``),
``DicomPath``, ``reason``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from archive_tools import _cli
from archive_tools.dicom_writer import (
    EIGHT_BIT_ONLY,
    ENCODINGS,
    PixelFormat,
    RadiographHeader,
    build_dataset,
    to_stored,
    write_dicom,
)
from archive_tools.phantom import chest_phantom
from beam_pipelines.contracts.metadata import (
    ABNORMAL,
    AGE,
    COLUMNS,
    DICOM_PATH,
    PATIENT_ID,
    SEX,
    STUDY_ID,
    VIEW_POSITION,
    format_label,
)

logger = logging.getLogger(__name__)

#: Default encoding mix: every lossless syntax, weighted roughly like real archives.
DEFAULT_ENCODINGS = "explicit_le:6,implicit_le:2,big_endian:1,deflate:1,rle:2,jpegls:2,j2k:3"
#: Broken-row kinds, in the order --broken cycles through them (stable reason codes).
BROKEN_KINDS: tuple[str, ...] = (
    "missing_file",
    "not_dicom",
    "truncated",
    "no_pixel_data",
    "duplicate_path",
    "path_escapes_root",
    "bad_label",
    "missing_patient_id",
)
IMAGE_COLUMNS: tuple[str, ...] = (
    DICOM_PATH,
    "Encoding",
    "Modality",
    "Rows",
    "Columns",
    "BitsStored",
    "PhotometricInterpretation",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    ABNORMAL,
)
REJECT_COLUMNS: tuple[str, ...] = ("row", DICOM_PATH, "reason")
MIN_SIZE_LIMIT = 32
MAX_SIZE_LIMIT = 4096
# Pixel formats: (bits stored, weight); 12-bit dominates real CR/DX archives.
_BITS = ((12, 0.6), (16, 0.15), (8, 0.1), (10, 0.08), (14, 0.07))
# Rescales seen in the wild; slope > 0 always (see PixelFormat).
_RESCALES = ((0.5, -1024.0), (2.0, 0.0), (1.0, -1024.0), (1.0, 100.0))
_FIRST_STUDY = dt.date(2012, 1, 1)


@dataclass
class SynthSummary:
    """What a run wrote.

    Attributes:
        output_dir: The archive root.
        patients: Patients generated.
        studies: Studies generated.
        images: DICOM files written for valid rows.
        abnormal_images: Valid rows labelled abnormal.
        broken_rows: Broken rows appended (see expected_rejects.csv).
        encodings: Encoding name -> number of valid images.
        seconds: Wall-clock time of the run.
    """

    output_dir: str
    patients: int = 0
    studies: int = 0
    images: int = 0
    abnormal_images: int = 0
    broken_rows: int = 0
    encodings: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def one_line(self) -> str:
        """A one-line human summary."""
        mix = ", ".join(f"{k}={v}" for k, v in sorted(self.encodings.items()))
        return (
            f"xray-synth: {self.patients} patients, {self.studies} studies, {self.images} images "
            f"({self.abnormal_images} abnormal), {self.broken_rows} broken rows -> "
            f"{self.output_dir} in {self.seconds:.1f}s [{mix}]"
        )


@dataclass(frozen=True)
class _Config:
    """Small picklable configuration sent to worker processes."""

    output_dir: str
    seed: int
    min_size: int
    max_size: int
    encodings: tuple[str, ...]
    weights: tuple[float, ...]
    id_width: int


@dataclass
class _PatientResult:
    rows: list[dict[str, str]]
    images: list[dict[str, str]]


def parse_encodings(text: str) -> dict[str, float]:
    """Parses ``name:weight,name:weight`` (weight defaults to 1).

    Raises:
        argparse.ArgumentTypeError: On unknown names, bad or all-zero weights.
    """
    mix: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight_text = part.partition(":")
        name = name.strip()
        if name not in ENCODINGS:
            raise argparse.ArgumentTypeError(
                f"unknown encoding {name!r}; choose from {', '.join(ENCODINGS)}"
            )
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight in {part!r}") from None
        if not weight >= 0 or weight == float("inf"):
            raise argparse.ArgumentTypeError(f"weight must be a finite number >= 0 in {part!r}")
        mix[name] = mix.get(name, 0.0) + weight
    if not mix or sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError(f"no encoding with a positive weight in {text!r}")
    return mix


def _size(text: str) -> int:
    value = _cli.positive_int(text)
    if not MIN_SIZE_LIMIT <= value <= MAX_SIZE_LIMIT:
        raise argparse.ArgumentTypeError(
            f"must be between {MIN_SIZE_LIMIT} and {MAX_SIZE_LIMIT} pixels, got {value}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The xray-synth argument parser."""
    parser = argparse.ArgumentParser(
        prog="xray-synth",
        description=(
            "Write a synthetic chest X-ray DICOM archive: DIR/raw/<PatientID>/<StudyID>_<n>.dcm "
            "plus DIR/metadata.csv (PatientID, StudyID, DicomPath, ViewPosition, Abnormal, Age, "
            "Sex). Deterministic for a seed, whatever --workers is."
        ),
    )
    parser.add_argument(
        "--output_dir", required=True, type=Path, help="Archive root to create (must be empty)."
    )
    parser.add_argument(
        "--patients", required=True, type=_cli.positive_int,
        help="Number of patients (1-4 studies each, 1-2 images per study).",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0, help="Random seed; same seed = same bytes (default 0)."
    )
    parser.add_argument(
        "--min_size", type=_size, default=256,
        help=f"Smallest image side in pixels ({MIN_SIZE_LIMIT}-{MAX_SIZE_LIMIT}, default 256).",
    )  # fmt: skip
    parser.add_argument(
        "--max_size", type=_size, default=512,
        help=f"Largest image side in pixels ({MIN_SIZE_LIMIT}-{MAX_SIZE_LIMIT}, default 512).",
    )  # fmt: skip
    parser.add_argument(
        "--encodings", type=parse_encodings, default=parse_encodings(DEFAULT_ENCODINGS),
        metavar="NAME:WEIGHT,...",
        help=(
            f"Weighted transfer-syntax mix. Names: {', '.join(ENCODINGS)}. jpeg_baseline is "
            "lossy and forces 8-bit pixels. Default: " + DEFAULT_ENCODINGS
        ),
    )  # fmt: skip
    parser.add_argument(
        "--broken", type=_cli.non_negative_int, default=0,
        help=(
            "Append this many broken rows, cycling through: " + ", ".join(BROKEN_KINDS)
            + "; each is listed in DIR/expected_rejects.csv (default 0)."
        ),
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=_cli.positive_int, default=_cli.default_workers(),
        help="Worker processes (default: all cores); does not change the output.",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help="Replace an existing archive in --output_dir (other files there are kept).",
    )  # fmt: skip
    return parser


def _patient_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(0, index)))


def _choose_format(rng: np.random.Generator, encoding: str) -> PixelFormat:
    """Draws a pixel format; 8-bit unsigned when the encoding demands it."""
    if encoding in EIGHT_BIT_ONLY:
        bits, signed = 8, False
    else:
        bits = int(rng.choice([b for b, _ in _BITS], p=[w for _, w in _BITS]))
        signed = bool(rng.random() < 0.1)
    photometric = "MONOCHROME1" if rng.random() < 0.15 else "MONOCHROME2"
    slope, intercept = 1.0, 0.0
    if rng.random() < 0.25:
        slope, intercept = _RESCALES[int(rng.integers(len(_RESCALES)))]
    center = width = None
    if rng.random() < 0.3:
        probe = PixelFormat(bits, photometric, signed, slope, intercept)
        lo, hi = probe.modality_range
        # A window covering most of the modality range, slightly off-centre, as a
        # modality would set it; in modality units (after rescale).
        width = float(round((hi - lo) * rng.uniform(0.8, 0.95)))
        center = float(round((lo + hi) / 2 + (hi - lo) * rng.uniform(-0.03, 0.03)))
    return PixelFormat(bits, photometric, signed, slope, intercept, center, width)


def _image_size(rng: np.random.Generator, cfg: _Config) -> tuple[int, int]:
    rows = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    cols = int(np.clip(round(rows * rng.uniform(0.8, 1.05)), cfg.min_size, cfg.max_size))
    return rows, cols


def _generate_patient(args: tuple[_Config, int]) -> _PatientResult:
    """Generates and writes every image of one patient (runs in a worker)."""
    cfg, index = args
    rng = _patient_rng(cfg.seed, index)
    anatomy_seed = int(rng.integers(2**63))
    patient_id = f"P{index + 1:0{cfg.id_width}d}"
    abnormal_patient = bool(rng.random() < 0.35)
    sex = str(rng.choice(["M", "F"]))
    sex_cell = "" if rng.random() < 0.03 else sex
    base_age = int(np.clip(round(rng.normal(60.0 if abnormal_patient else 50.0, 16.0)), 18, 85))
    n_studies = int(rng.choice([1, 2, 3, 4], p=[0.45, 0.3, 0.15, 0.1]))
    date = _FIRST_STUDY + dt.timedelta(days=int(rng.integers(0, 10 * 365)))
    first_date = date
    probabilities = np.asarray(cfg.weights) / sum(cfg.weights)
    rows: list[dict[str, str]] = []
    images: list[dict[str, str]] = []
    study_labels = [
        bool(rng.random() < 0.8) if abnormal_patient else False for _ in range(n_studies)
    ]
    if abnormal_patient and not any(study_labels):
        study_labels[int(rng.integers(n_studies))] = True
    patient_dir = Path(cfg.output_dir, "raw", patient_id)
    patient_dir.mkdir(parents=True, exist_ok=True)
    for s in range(n_studies):
        if s:
            date += dt.timedelta(days=int(rng.integers(7, 700)))
        age = min(base_age + (date - first_date).days // 365, 90)
        study_id = f"S{s + 1:04d}"
        abnormal = study_labels[s]
        inpatient = rng.random() < (0.5 if abnormal else 0.2)
        views = ["AP" if inpatient else "PA"]
        if rng.random() < 0.35:
            views.append("LATERAL" if rng.random() < 0.85 else views[0])
        modality = "DX" if rng.random() < 0.6 else "CR"
        spacing = float(rng.choice([0.1, 0.139, 0.143, 0.16, 0.2]))
        for n, view in enumerate(views, start=1):
            encoding = str(rng.choice(cfg.encodings, p=probabilities))
            fmt = _choose_format(rng, encoding)
            height, width = _image_size(rng, cfg)
            display = chest_phantom(
                rng, height, width, abnormal=abnormal, view=view,
                anatomy=np.random.default_rng(anatomy_seed),
            )  # fmt: skip
            rel = f"raw/{patient_id}/{study_id}_{n}.dcm"
            header = RadiographHeader(
                patient_id=patient_id,
                study_id=study_id,
                view_position=view,
                modality=modality,
                patient_age=age,
                patient_sex=sex_cell or None,
                patient_name=f"SYNTH^{patient_id}",
                pixel_spacing=(spacing, spacing),
                study_date=date.strftime("%Y%m%d"),
                series_number=n,
                instance_number=1,
                uid_seed=f"xray-synth:{cfg.seed}",
                extra={"Manufacturer": "xray-pipelines synthetic", "InstitutionName": "SYNTH"},
            )
            write_dicom(Path(cfg.output_dir, rel), to_stored(display, fmt), fmt, encoding, header)
            rows.append(
                {
                    PATIENT_ID: patient_id,
                    STUDY_ID: study_id,
                    DICOM_PATH: rel,
                    VIEW_POSITION: view,
                    ABNORMAL: format_label(abnormal),
                    AGE: str(age),
                    SEX: sex_cell,
                }
            )
            images.append(_image_row(rel, encoding, modality, height, width, fmt, abnormal))
    return _PatientResult(rows, images)


def _image_row(
    rel: str,
    encoding: str,
    modality: str,
    height: int,
    width: int,
    fmt: PixelFormat,
    abnormal: bool,
) -> dict[str, str]:
    def num(value: float | None) -> str:
        return "" if value is None else f"{value:g}"

    return {
        DICOM_PATH: rel,
        "Encoding": encoding,
        "Modality": modality,
        "Rows": str(height),
        "Columns": str(width),
        "BitsStored": str(fmt.bits_stored),
        "PhotometricInterpretation": fmt.photometric,
        "PixelRepresentation": str(int(fmt.signed)),
        "RescaleSlope": num(fmt.rescale_slope) if fmt.has_rescale else "",
        "RescaleIntercept": num(fmt.rescale_intercept) if fmt.has_rescale else "",
        "WindowCenter": num(fmt.window_center),
        "WindowWidth": num(fmt.window_width),
        ABNORMAL: format_label(abnormal),
    }


def _patient_results(cfg: _Config, patients: int, workers: int) -> Iterator[_PatientResult]:
    tasks = ((cfg, i) for i in range(patients))
    if workers == 1 or patients == 1:
        yield from map(_generate_patient, tasks)
        return
    # imap keeps patient order, so the CSV is the same for any worker count.
    chunksize = max(1, min(16, patients // (workers * 8)))
    with multiprocessing.Pool(min(workers, patients)) as pool:
        yield from pool.imap(_generate_patient, tasks, chunksize=chunksize)


def _broken_dataset_bytes(rng: np.random.Generator, patient_id: str, seed: int, k: int) -> bytes:
    """A small valid DICOM (12-bit, explicit LE) for broken rows that need one."""
    fmt = PixelFormat(12)
    display = chest_phantom(rng, 64, 64, abnormal=False)
    header = RadiographHeader(
        patient_id=patient_id,
        study_id="S0001",
        patient_age=50,
        patient_name=f"SYNTH^{patient_id or 'BROKEN'}",
        uid_seed=f"xray-synth:{seed}:broken:{k}",
    )
    buffer = io.BytesIO()
    write_dicom(buffer, to_stored(display, fmt), fmt, "explicit_le", header)
    return buffer.getvalue()


def _write_broken(
    output_dir: Path, seed: int, count: int, first_row: int, valid_rows: list[dict[str, str]]
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Creates ``count`` broken rows (and their files); returns (metadata rows, rejects)."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(1,)))
    broken_dir = output_dir / "raw" / "broken"
    rows: list[dict[str, str]] = []
    rejects: list[dict[str, str]] = []
    for k in range(count):
        kind = BROKEN_KINDS[k % len(BROKEN_KINDS)]
        round_ = k // len(BROKEN_KINDS)
        patient_id = f"B{k + 1:04d}"
        rel = f"raw/broken/{patient_id}_{kind}.dcm"
        row = {
            PATIENT_ID: patient_id,
            STUDY_ID: "S0001",
            DICOM_PATH: rel,
            VIEW_POSITION: "PA",
            ABNORMAL: "false",
            AGE: "50",
            SEX: "F",
        }
        broken_dir.mkdir(parents=True, exist_ok=True)
        target = output_dir / rel
        if kind == "missing_file":
            pass  # The row points at a file that is never written.
        elif kind == "not_dicom":
            if round_ % 2:
                Image.fromarray(np.zeros((8, 8), np.uint8)).save(target, format="PNG")
            else:
                target.write_text("this is not a DICOM file\n", encoding="utf-8")
        elif kind == "truncated":
            data = _broken_dataset_bytes(rng, patient_id, seed, k)
            # Cut in the middle of the pixel data (PixelData is the last element).
            target.write_bytes(data[: len(data) - 64 * 64 * 2 // 2])
        elif kind == "no_pixel_data":
            ds = build_dataset(
                np.zeros((64, 64), np.uint16), PixelFormat(12), "explicit_le",
                RadiographHeader(patient_id, "S0001", patient_name=f"SYNTH^{patient_id}",
                                 uid_seed=f"xray-synth:{seed}:broken:{k}"),
            )  # fmt: skip
            del ds.PixelData
            ds.save_as(target, enforce_file_format=True)
        elif kind == "duplicate_path":
            # A verbatim copy of an earlier valid row: the later occurrence is rejected.
            row = dict(valid_rows[round_ % len(valid_rows)])
            rel = row[DICOM_PATH]
        elif kind == "path_escapes_root":
            rel = f"../outside_{k + 1}.dcm"
            row[DICOM_PATH] = rel
            # The file exists and is valid, so only the path rule can reject it.
            (output_dir / rel).write_bytes(_broken_dataset_bytes(rng, patient_id, seed, k))
        elif kind == "bad_label":
            target.write_bytes(_broken_dataset_bytes(rng, patient_id, seed, k))
            row[ABNORMAL] = "maybe"
        elif kind == "missing_patient_id":
            target.write_bytes(_broken_dataset_bytes(rng, "", seed, k))
            row[PATIENT_ID] = ""
        rejects.append({"row": str(first_row + len(rows)), DICOM_PATH: rel, "reason": kind})
        rows.append(row)
    return rows, rejects


def run(argv: list[str] | None = None) -> SynthSummary:
    """Parses ``argv`` and writes the archive.

    Args:
        argv: Command-line arguments (without the program name); None reads sys.argv.

    Returns:
        What was written.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.min_size > args.max_size:
        parser.error(f"--min_size {args.min_size} is larger than --max_size {args.max_size}")
    mix: dict[str, float] = {k: v for k, v in args.encodings.items() if v > 0}
    output_dir: Path = args.output_dir
    _cli.prepare_output_dir(parser, output_dir, args.overwrite)
    started = time.perf_counter()
    cfg = _Config(
        output_dir=str(output_dir),
        seed=args.seed,
        min_size=args.min_size,
        max_size=args.max_size,
        encodings=tuple(mix),
        weights=tuple(mix.values()),
        id_width=max(6, len(str(args.patients))),
    )
    logger.info(
        "Writing %d patients to %s (seed %d, sizes %d-%d, %d workers, encodings %s)",
        args.patients, output_dir, args.seed, args.min_size, args.max_size, args.workers, mix,
    )  # fmt: skip
    summary = SynthSummary(output_dir=str(output_dir), patients=args.patients)
    encodings: Counter[str] = Counter()
    first_rows: list[dict[str, str]] = []  # A few valid rows to duplicate.
    with (
        open(output_dir / "metadata.csv", "w", newline="", encoding="utf-8") as meta_file,
        open(output_dir / "synth_images.csv", "w", newline="", encoding="utf-8") as image_file,
    ):
        meta = csv.DictWriter(meta_file, fieldnames=list(COLUMNS), lineterminator="\n")
        image_csv = csv.DictWriter(image_file, fieldnames=list(IMAGE_COLUMNS), lineterminator="\n")
        meta.writeheader()
        image_csv.writeheader()
        for result in _patient_results(cfg, args.patients, args.workers):
            meta.writerows(result.rows)
            image_csv.writerows(result.images)
            for row, image in zip(result.rows, result.images, strict=True):
                encodings[image["Encoding"]] += 1
                summary.abnormal_images += row[ABNORMAL] == "true"
            if len(first_rows) < len(BROKEN_KINDS):
                first_rows.extend(result.rows[: len(BROKEN_KINDS) - len(first_rows)])
            summary.images += len(result.rows)
            summary.studies += len({row[STUDY_ID] for row in result.rows})
        if args.broken:
            broken_rows, rejects = _write_broken(
                output_dir, args.seed, args.broken, summary.images + 1, first_rows
            )
            meta.writerows(broken_rows)
            with open(
                output_dir / "expected_rejects.csv", "w", newline="", encoding="utf-8"
            ) as reject_file:
                writer = csv.DictWriter(
                    reject_file, fieldnames=list(REJECT_COLUMNS), lineterminator="\n"
                )
                writer.writeheader()
                writer.writerows(rejects)
            summary.broken_rows = len(rejects)
    summary.encodings = dict(sorted(encodings.items()))
    summary.seconds = time.perf_counter() - started
    logger.info("Synthetic archive written: %s", asdict(summary))
    return summary


def main() -> None:
    """Console entry point: INFO logging, run, one-line summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    _cli.quiet_codec_loggers()
    print(run().one_line())


if __name__ == "__main__":
    main()
