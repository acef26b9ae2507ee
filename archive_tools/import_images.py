"""xray-import: turns labelled PNG/JPEG radiographs into a DICOM archive with metadata.csv.

Input is either a folder with one sub-folder per class (``--images_dir``) or a
CSV (``--labels_csv``) with columns ``path,label`` and optionally
``patient_id``, ``age``, ``sex``, ``view_position`` (alias ``view``) and
``study_id``; any other CSV column is carried into metadata.csv. Output::

    OUT/raw/<PatientID>/<image name>.dcm   8-bit MONOCHROME2, Secondary Capture or DX
    OUT/metadata.csv                       beam_pipelines.contracts.metadata.COLUMNS + extras
                                           + SourcePath, SourceLabel
    OUT/import_errors.csv                  path,reason,detail of unreadable images

Rows keep the input order whatever ``--workers`` is, and the output bytes are
deterministic (UIDs are derived from the source path and IDs).
"""

from __future__ import annotations

import argparse
import csv
import logging
import multiprocessing
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom.uid import generate_uid

from archive_tools import _cli
from archive_tools.dicom_writer import (
    ENCODINGS,
    PixelFormat,
    RadiographHeader,
    write_dicom,
)
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
    parse_age,
    parse_sex,
)

logger = logging.getLogger(__name__)

DEFAULT_NORMAL_CLASSES: tuple[str, ...] = (
    "normal",
    "no finding",
    "no_finding",
    "negative",
    "0",
    "false",
)
DEFAULT_ABNORMAL_CLASSES: tuple[str, ...] = ("abnormal", "pneumonia", "positive", "1", "true")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
#: Input CSV columns with a meaning; every other column is carried through.
KNOWN_CSV_COLUMNS = frozenset(
    {"path", "label", "patient_id", "age", "sex", "view_position", "view", "study_id"}
)
SOURCE_PATH = "SourcePath"
SOURCE_LABEL = "SourceLabel"
ERROR_COLUMNS: tuple[str, ...] = ("path", "reason", "detail")
_FORMAT = PixelFormat(8)


@dataclass
class ImportSummary:
    """What a run wrote.

    Attributes:
        output_dir: The archive root.
        inputs: Input images listed.
        images: DICOM files written (rows in metadata.csv).
        abnormal: Written rows labelled abnormal.
        errors: Images that could not be read (rows in import_errors.csv).
        error_reasons: Reason code -> count.
        encoding: The transfer syntax name used.
        strict: Whether errors make the exit status non-zero.
        seconds: Wall-clock time of the run.
    """

    output_dir: str
    inputs: int = 0
    images: int = 0
    abnormal: int = 0
    errors: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)
    encoding: str = "explicit_le"
    strict: bool = False
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """1 when --strict and some image failed, else 0."""
        return 1 if self.strict and self.errors else 0

    def one_line(self) -> str:
        """A one-line human summary."""
        return (
            f"xray-import: {self.images}/{self.inputs} images written ({self.abnormal} abnormal, "
            f"{self.errors} unreadable) as {self.encoding} -> {self.output_dir} "
            f"in {self.seconds:.1f}s"
        )


@dataclass(frozen=True)
class _Entry:
    """One input image before IDs are resolved."""

    source: Path
    shown_path: str  # As the user wrote it; used in import_errors.csv and SourcePath.
    label: str
    patient_id: str = ""
    study_id: str = ""
    age: str = ""
    sex: str = ""
    view: str = ""
    extras: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Task:
    source: str
    target: str
    encoding: str
    header: RadiographHeader


class ImageReadError(ValueError):
    """An input image that cannot be turned into 8-bit grayscale pixels.

    Attributes:
        reason: Stable reason code (``missing_file``, ``unreadable_image``,
            ``unsupported_image``).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _class_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of class names")
    return names


def _regex(text: str) -> re.Pattern[str]:
    try:
        pattern = re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {exc}") from None
    if pattern.groups < 1:
        raise argparse.ArgumentTypeError(f"{text!r} needs a capturing group for the patient ID")
    return pattern


def build_parser() -> argparse.ArgumentParser:
    """The xray-import argument parser."""
    parser = argparse.ArgumentParser(
        prog="xray-import",
        description=(
            "Turn labelled PNG/JPEG radiographs into a DICOM archive: "
            "OUT/raw/<PatientID>/<name>.dcm plus OUT/metadata.csv."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--images_dir", type=Path,
        help="Folder with one sub-folder per class (e.g. NORMAL/, PNEUMONIA/).",
    )  # fmt: skip
    source.add_argument(
        "--labels_csv", type=Path,
        help=(
            "CSV with columns path,label and optional patient_id, age, sex, view_position "
            "(or view), study_id; other columns are carried into metadata.csv."
        ),
    )  # fmt: skip
    parser.add_argument(
        "--images_root", type=Path,
        help="Folder the CSV paths are relative to (default: the CSV's folder).",
    )  # fmt: skip
    parser.add_argument("--output_dir", required=True, type=Path, help="Archive root to create.")
    parser.add_argument(
        "--normal_classes", type=_class_list,
        help="Comma-separated labels meaning normal, case-insensitive "
        f"(default: {','.join(DEFAULT_NORMAL_CLASSES)}).",
    )  # fmt: skip
    parser.add_argument(
        "--abnormal_classes", type=_class_list,
        help="Comma-separated labels meaning abnormal, case-insensitive "
        f"(default: {','.join(DEFAULT_ABNORMAL_CLASSES)}).",
    )  # fmt: skip
    parser.add_argument(
        "--patient_id_regex", type=_regex,
        help=(
            "Regex searched in the file name; its first group is the PatientID when the CSV "
            "has none (default: the file stem, i.e. one patient per image)."
        ),
    )  # fmt: skip
    parser.add_argument(
        "--modality", choices=("OT", "DX", "CR"), default="OT",
        help="OT writes Secondary Capture (default); DX/CR write X-ray SOP classes.",
    )  # fmt: skip
    parser.add_argument(
        "--encoding", choices=tuple(ENCODINGS), default="explicit_le",
        help="Transfer syntax (default explicit_le); all but jpeg_baseline are lossless.",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=_cli.positive_int, default=_cli.default_workers(),
        help="Worker processes (default: all cores); does not change the output.",
    )  # fmt: skip
    parser.add_argument(
        "--strict", action="store_true",
        help="Exit with status 1 when any image could not be read (they are always listed "
        "in OUT/import_errors.csv).",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help="Replace an existing archive in --output_dir (other files there are kept).",
    )  # fmt: skip
    return parser


def load_grayscale_8bit(path: str | Path) -> np.ndarray:
    """Reads an image file as 8-bit grayscale pixels.

    Grayscale stays as is; RGB with identical channels keeps one channel
    (exactly); real colour becomes ITU-R 601 luminance; 16-bit grayscale is
    scaled to 8 bits (value / 257, rounded).

    Args:
        path: The image file.

    Returns:
        A 2-D uint8 array.

    Raises:
        ImageReadError: When the file is missing, unreadable or not a supported image.
    """
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode == "L":
                return np.array(image, dtype=np.uint8)
            if mode in ("I;16", "I;16L", "I;16B", "I"):
                wide = np.asarray(image, dtype=np.int64)
                if wide.min() < 0 or wide.max() > 65535:
                    raise ImageReadError("unsupported_image", f"{mode} values outside 16 bits")
                return np.rint(wide / 257.0).astype(np.uint8)
            if mode in ("1", "P", "PA", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
                rgb = image.convert("RGB")
                channels = np.asarray(rgb)
                if np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(
                    channels[..., 0], channels[..., 2]
                ):
                    return np.ascontiguousarray(channels[..., 0])
                return np.array(rgb.convert("L"), dtype=np.uint8)
            raise ImageReadError("unsupported_image", f"unsupported image mode {mode}")
    except FileNotFoundError as exc:
        raise ImageReadError("missing_file", str(exc)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        # Pillow raises OSError for truncated data and SyntaxError for some bad headers.
        raise ImageReadError("unreadable_image", f"{type(exc).__name__}: {exc}") from exc


def _convert(task: _Task) -> tuple[str, str] | None:
    """Writes one DICOM (runs in a worker); returns (reason, detail) on failure."""
    try:
        pixels = load_grayscale_8bit(task.source)
    except ImageReadError as exc:
        return exc.reason, exc.detail
    if min(pixels.shape) < 1:
        return "unsupported_image", "empty image"
    Path(task.target).parent.mkdir(parents=True, exist_ok=True)
    write_dicom(task.target, pixels, _FORMAT, task.encoding, task.header)
    return None


def _folder_entries(parser: argparse.ArgumentParser, images_dir: Path) -> list[_Entry]:
    if not images_dir.is_dir():
        parser.error(f"--images_dir {images_dir} is not a directory")
    entries: list[_Entry] = []
    classes = sorted(p for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for class_dir in classes:
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
        )
        entries.extend(
            _Entry(source=p, shown_path=p.relative_to(images_dir).as_posix(), label=class_dir.name)
            for p in files
        )
    if not entries:
        parser.error(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in class sub-folders of {images_dir}"
        )
    return entries


def _csv_entries(
    parser: argparse.ArgumentParser, labels_csv: Path, root: Path
) -> tuple[list[_Entry], list[str]]:
    if not labels_csv.is_file():
        parser.error(f"--labels_csv {labels_csv} does not exist")
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [name.strip() for name in reader.fieldnames or []]
        lowered = [name.lower() for name in fields]
        missing = {"path", "label"} - set(lowered)
        if missing:
            parser.error(f"{labels_csv} lacks column(s) {', '.join(sorted(missing))}; has {fields}")
        extras = [name for name in fields if name.lower() not in KNOWN_CSV_COLUMNS]
        clashes = sorted(set(extras) & {*COLUMNS, SOURCE_PATH, SOURCE_LABEL})
        if clashes:
            parser.error(f"{labels_csv} has columns that clash with metadata.csv: {clashes}")
        entries: list[_Entry] = []
        for raw in reader:
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
            if not row.get("path"):
                parser.error(f"{labels_csv} line {reader.line_num}: empty path")
            source = Path(row["path"])
            entries.append(
                _Entry(
                    source=source if source.is_absolute() else root / source,
                    shown_path=row["path"],
                    label=row["label"],
                    patient_id=row.get("patient_id", ""),
                    study_id=row.get("study_id", ""),
                    age=row.get("age", ""),
                    sex=row.get("sex", ""),
                    view=row.get("view_position") or row.get("view", ""),
                    extras=tuple((name, (raw.get(name) or "").strip()) for name in extras),
                )
            )
    if not entries:
        parser.error(f"{labels_csv} has no rows")
    return entries, extras


def _label_map(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, bool]:
    normal = args.normal_classes or DEFAULT_NORMAL_CLASSES
    abnormal = args.abnormal_classes or DEFAULT_ABNORMAL_CLASSES
    both = sorted(set(normal) & set(abnormal))
    if both:
        parser.error(f"labels listed as both normal and abnormal: {both}")
    return {**{n: False for n in normal}, **{n: True for n in abnormal}}


def run(argv: list[str] | None = None) -> ImportSummary:
    """Parses ``argv`` and imports the images.

    Args:
        argv: Command-line arguments (without the program name); None reads sys.argv.

    Returns:
        What was written; ``exit_code`` tells the caller whether to fail.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    labels = _label_map(parser, args)
    extras: list[str] = []
    if args.images_dir is not None:
        if args.images_root is not None:
            parser.error("--images_root only applies to --labels_csv")
        entries = _folder_entries(parser, args.images_dir)
    else:
        root = args.images_root or args.labels_csv.parent
        entries, extras = _csv_entries(parser, args.labels_csv, root)

    unknown = Counter(e.label for e in entries if e.label.strip().lower() not in labels)
    if unknown:
        listed = ", ".join(f"{label!r} ({n})" for label, n in sorted(unknown.items()))
        parser.error(
            f"unknown labels: {listed}; known: {', '.join(sorted(labels))} "
            "(use --normal_classes / --abnormal_classes)"
        )
    output_dir: Path = args.output_dir
    _cli.prepare_output_dir(parser, output_dir, args.overwrite)
    started = time.perf_counter()

    rows, tasks = _plan(entries, labels, args, output_dir)
    summary = ImportSummary(
        output_dir=str(output_dir), inputs=len(entries), encoding=args.encoding, strict=args.strict
    )
    reasons: Counter[str] = Counter()
    columns = [*COLUMNS, *extras, SOURCE_PATH, SOURCE_LABEL]
    with (
        open(output_dir / "metadata.csv", "w", newline="", encoding="utf-8") as meta_file,
        open(output_dir / "import_errors.csv", "w", newline="", encoding="utf-8") as error_file,
    ):
        meta = csv.DictWriter(meta_file, fieldnames=columns, lineterminator="\n")
        errors = csv.DictWriter(error_file, fieldnames=list(ERROR_COLUMNS), lineterminator="\n")
        meta.writeheader()
        errors.writeheader()
        for entry, row, failure in zip(entries, rows, _results(tasks, args.workers), strict=True):
            if failure is None:
                meta.writerow(row)
                summary.images += 1
                summary.abnormal += row[ABNORMAL] == "true"
            else:
                reason, detail = failure
                reasons[reason] += 1
                errors.writerow({"path": entry.shown_path, "reason": reason, "detail": detail})
    summary.errors = sum(reasons.values())
    summary.error_reasons = dict(sorted(reasons.items()))
    summary.seconds = time.perf_counter() - started
    if summary.errors:
        logger.warning(
            "%d of %d images could not be read (%s); listed in %s",
            summary.errors, summary.inputs, summary.error_reasons,
            output_dir / "import_errors.csv",
        )  # fmt: skip
    logger.info("Import finished: %s", asdict(summary))
    return summary


def _plan(
    entries: list[_Entry],
    labels: dict[str, bool],
    args: argparse.Namespace,
    output_dir: Path,
) -> tuple[list[dict[str, str]], list[_Task]]:
    """Resolves IDs and output names in input order (so any worker count gives the same files)."""
    rows: list[dict[str, str]] = []
    tasks: list[_Task] = []
    used_names: set[str] = set()
    studies_per_patient: Counter[str] = Counter()
    instances: Counter[tuple[str, str]] = Counter()
    stem_patients = regex_misses = 0
    for entry in entries:
        patient_id = entry.patient_id
        if not patient_id and args.patient_id_regex is not None:
            match = args.patient_id_regex.search(entry.source.name)
            if match and match.group(1):
                patient_id = match.group(1)
            else:
                regex_misses += 1
        if not patient_id:
            patient_id = entry.source.stem
            stem_patients += 1
        study_id = entry.study_id
        if not study_id:
            studies_per_patient[patient_id] += 1
            study_id = f"S{studies_per_patient[patient_id]:04d}"
        instances[(patient_id, study_id)] += 1
        folder = _cli.safe_name(patient_id)
        stem = _cli.safe_name(entry.source.stem)
        name, n = stem, 1
        # Case-insensitive, so the archive also unpacks on macOS/Windows file systems.
        while f"{folder}/{name}".lower() in used_names:
            n += 1
            name = f"{stem}_{n}"
        used_names.add(f"{folder}/{name}".lower())
        rel = f"raw/{folder}/{name}.dcm"
        abnormal = labels[entry.label.strip().lower()]
        age = parse_age(entry.age)
        sex = parse_sex(entry.sex)
        view = entry.view.strip().upper()
        header = RadiographHeader(
            patient_id=patient_id,
            study_id=study_id,
            view_position=view,
            modality=args.modality,
            patient_age=age,
            patient_sex=sex,
            pixel_spacing=None,
            study_date="",
            study_time="",
            instance_number=instances[(patient_id, study_id)],
            study_instance_uid=generate_uid(entropy_srcs=["xray-import", patient_id, study_id]),
            series_instance_uid=generate_uid(
                entropy_srcs=["xray-import", patient_id, study_id, "series"]
            ),
            sop_instance_uid=generate_uid(entropy_srcs=["xray-import", entry.shown_path]),
        )
        tasks.append(_Task(str(entry.source), str(output_dir / rel), args.encoding, header))
        row = {
            PATIENT_ID: patient_id,
            STUDY_ID: study_id,
            DICOM_PATH: rel,
            VIEW_POSITION: view,
            ABNORMAL: format_label(abnormal),
            AGE: "" if age is None else str(age),
            SEX: sex or "",
            **dict(entry.extras),
            SOURCE_PATH: entry.shown_path,
            SOURCE_LABEL: entry.label,
        }
        rows.append(row)
    if regex_misses:
        logger.warning("--patient_id_regex did not match %d file names", regex_misses)
    if stem_patients:
        logger.warning(
            "%d images have no patient ID; each becomes its own patient (file stem). "
            "Images of one patient may then land in different splits: pass patient_id "
            "in the CSV or --patient_id_regex",
            stem_patients,
        )
    return rows, tasks


def _results(tasks: list[_Task], workers: int) -> Iterator[tuple[str, str] | None]:
    if workers == 1 or len(tasks) < 2:
        yield from map(_convert, tasks)
        return
    chunksize = max(1, min(32, len(tasks) // (workers * 8)))
    with multiprocessing.Pool(min(workers, len(tasks))) as pool:
        # imap keeps input order, so rows and errors come out in input order.
        yield from pool.imap(_convert, tasks, chunksize=chunksize)


def main() -> None:
    """Console entry point: INFO logging, run, one-line summary, exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    _cli.quiet_codec_loggers()
    summary = run()
    print(summary.one_line())
    sys.exit(summary.exit_code)


if __name__ == "__main__":
    main()
