"""Decode-or-reject: the one step that turns an input's DICOM into a model input.

Both jobs decode with :func:`decode_or_reject`, so an image is decoded,
resized and (for scoring) quantized exactly as the record preprocessing
stores it, and a file that cannot be decoded becomes a reject record with
its reason instead of failing the job. Preprocessing's stage also stages
the compressed record (:class:`DecodeAndStageFn`); scoring's keeps the image
for the model (:class:`DecodeForScoringFn`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from beam_pipelines import dicom, malloc_tuning
from beam_pipelines.contracts import predictions, records
from beam_pipelines.contracts.rejects import INTERNAL_ERROR, internal_error_detail, reject
from beam_pipelines.privacy import Pseudonymizer, install_log_filters
from beam_pipelines.storage import sharding, staging, tfrecord
from beam_pipelines.transforms.outcomes import KEPT, REJECTED, Progress
from beam_pipelines.transforms.rows import ValidRow
from beam_pipelines.transforms.shards import record_shards

logger = logging.getLogger(__name__)


def decode_or_reject(
    stage: type,
    path: str,
    shown: str,
    row: int | None,
    options: dicom.DecodeOptions,
    policy: dicom.ResizePolicy,
) -> tuple[np.ndarray, dicom.DecodedImage] | dict[str, Any]:
    """(model input, decoded image) of the DICOM at ``path``, or its reject record.

    ``shown`` is the path the reject names (the metadata's DicomPath, not the
    resolved one); counters go to ``stage``'s namespace. A bug on one input
    rejects that input (``internal_error``) and the job goes on; MemoryError
    is the worker's problem and propagates.
    """
    try:
        return dicom.decode_model_input(path, options, policy=policy)
    except dicom.DicomRejected as rejected:
        Metrics.counter(stage, f"rejected_{rejected.reason}").inc()
        return reject(row, shown, "decode", rejected.reason, rejected.detail)
    except MemoryError:
        raise
    except Exception as exc:  # a bug on one input: that input is rejected, the job goes on
        Metrics.counter(stage, f"rejected_{INTERNAL_ERROR}").inc()
        return reject(
            row, shown, "decode", INTERNAL_ERROR, internal_error_detail(exc, "decode", row)
        )


def make_record(
    row: ValidRow,
    image: np.ndarray,
    decoded: dicom.DecodedImage,
    pseudonymizer: Pseudonymizer | None = None,
) -> dict[str, Any]:
    """A schema record (224x224x1 image + metadata) of a decoded row.

    With a pseudonymizer the row's identifiers are already pseudonyms; the
    header's SOP Instance UID is replaced here.
    """
    header = decoded.header
    return {
        "row": row.row,
        "image": image,
        "label": int(bool(row.abnormal)),
        "patient_id": row.patient_id,
        "study_id": row.study_id,
        "dicom_path": row.dicom_path,
        "view_position": row.view_position or header.view_position,
        # metadata.csv wins; the header fills what the CSV leaves unknown.
        "age": row.age if row.age is not None else header.patient_age,
        "sex": row.sex or header.patient_sex or "",
        "original_rows": header.rows,
        "original_columns": header.columns,
        "sop_instance_uid": (
            pseudonymizer(header.sop_instance_uid) if pseudonymizer else header.sop_instance_uid
        ),
        "extra": row.extra,
    }


def pixel_sums(stored: np.ndarray) -> tuple[int, int, int]:
    """Exact (sum, sum of squares, count) of stored 16-bit pixel values.

    The squares' sum stays below 2**53 for any image of fewer than 2**21
    pixels, so float64 arithmetic is exact here and ~7x faster than uint64.
    """
    values = stored.astype(np.float64).ravel()
    return int(stored.sum(dtype=np.uint64)), int(values @ values), values.size


def _count_decode(stage: type, decoded: dicom.DecodedImage) -> None:
    Metrics.counter(stage, "decoded").inc()
    Metrics.counter(stage, f"decode_path_{decoded.route}").inc()


class DecodeAndStageFn(beam.DoFn):
    """Decodes one row, stages its compressed record, emits a small summary.

    Only the summary (row, split, shard, staged chunk's reference, label,
    pixel sums) travels on: images never cross a stage boundary, so no runner
    has to hold them in memory, whatever the archive's size.
    """

    def __init__(
        self,
        options: dicom.DecodeOptions,
        resize_policy: dicom.ResizePolicy,
        staging_dir: str,
        num_shards: int,
        pseudonymizer: Pseudonymizer | None = None,
    ) -> None:
        self._options = options
        self._resize_policy = resize_policy
        self._staging_dir = staging_dir
        self._num_shards = num_shards
        self._pseudonymizer = pseudonymizer

    def setup(self) -> None:
        # A worker never runs the CLI: the decoding stage sets up its own process.
        install_log_filters()
        malloc_tuning.keep_freed_buffers()
        self._progress = Progress("decoded and staged images")
        self._stager = staging.BundleStager(self._staging_dir)

    def start_bundle(self) -> None:
        # A bundle that failed before finish_bundle left its file open; its
        # chunks are referenced by nothing, so failing to close it is no error.
        try:
            self._stager.close()
        except OSError as exc:
            logger.warning("could not close an abandoned staging file: %s", exc)

    def finish_bundle(self) -> None:
        self._stager.close()
        self._progress.flush()

    def teardown(self) -> None:
        self._stager.close()

    def process(
        self, row: ValidRow, assignment: dict[str, str], sizes: dict[str, int]
    ) -> Iterator[Any]:
        yield from self.decode_row(row, assignment[row.patient_id], sizes)

    def decode_row(self, row: ValidRow, split: str, sizes: dict[str, int]) -> Iterator[Any]:
        """(KEPT, summary) or (REJECTED, record) for one row of a known split."""
        self._progress.tick()
        stage = self.__class__
        result = decode_or_reject(
            stage, row.resolved_path, row.dicom_path, row.row, self._options, self._resize_policy
        )
        if isinstance(result, dict):
            yield REJECTED, result
            return
        image, decoded = result
        _count_decode(stage, decoded)
        if decoded.inverted:
            Metrics.counter(stage, "monochrome1_inverted").inc()
        Metrics.counter(stage, f"intensity_{decoded.intensity_source}").inc()
        record = make_record(row, image, decoded, self._pseudonymizer)
        shards = record_shards(sizes[split], self._num_shards)
        shard = sharding.shard_of(row.dicom_path, shards)
        # Quantized once: the record stores these values and the statistics sum them.
        record["image"] = records.quantize(record["image"])
        # Compressed here, in parallel: the shard writer only concatenates.
        staged = self._stager.append(tfrecord.compress_record(records.serialize(record)))
        sums = pixel_sums(record["image"]) if split == "train" else (0, 0, 0)
        yield (
            KEPT,
            {
                "row": row.row,
                "split": split,
                "label": record["label"],
                "shard": (split, shard, shards),
                "staged": staged,
                "pixel_sums": sums,
            },
        )


#: The meta key holding a decoded image's header reference (``reference_keywords``).
SOURCE = "source"


def prediction_columns(**values: Any) -> dict[str, Any]:
    """The prediction columns known before scoring, plus ``row`` (blank strings become null)."""
    meta = {key: values.get(key) for key in (*predictions.IMAGE_COLUMNS, "split", "row")}
    for key in ("patient_id", "study_id", "view_position", "sex"):
        meta[key] = meta[key] or None
    return meta


class DecodeForScoringFn(beam.DoFn):
    """DICOM (from a metadata row or a bare path) -> (meta, model input) or a reject.

    With ``options.reference_keywords`` the meta also holds ``source``: those
    header values, which a Structured Report of the score needs (patient,
    study, the image's UIDs).
    """

    def __init__(self, options: dicom.DecodeOptions, resize_policy: dicom.ResizePolicy) -> None:
        self._options = options
        self._resize_policy = resize_policy

    def setup(self) -> None:
        install_log_filters()  # as DecodeAndStageFn: workers never run the CLI
        malloc_tuning.keep_freed_buffers()
        self._progress = Progress("decoded images")

    def finish_bundle(self) -> None:
        self._progress.flush()

    def process(self, element: ValidRow | str) -> Iterator[Any]:
        self._progress.tick()
        row = element if isinstance(element, ValidRow) else None
        path = row.resolved_path if row else str(element)
        shown = row.dicom_path if row else path
        stage = self.__class__
        result = decode_or_reject(
            stage, path, shown, row.row if row else None, self._options, self._resize_policy
        )
        if isinstance(result, dict):
            yield REJECTED, result
            return
        model_image, decoded = result
        header = decoded.header
        meta = prediction_columns(
            dicom_path=shown,
            row=row.row if row else None,
            patient_id=(row.patient_id if row else "") or header.patient_id,
            study_id=(row.study_id if row else "") or header.study_id,
            view_position=(row.view_position if row else "") or header.view_position,
            age=row.age if row and row.age is not None else header.patient_age,
            sex=(row.sex if row else None) or header.patient_sex,
            label=None if row is None or row.abnormal is None else int(row.abnormal),
        )
        if self._options.reference_keywords:
            meta[SOURCE] = dict(header.reference)
        _count_decode(stage, decoded)
        # Quantized as a record stores it: an image scores the same from its DICOM and its shard.
        yield KEPT, (meta, records.as_stored(model_image))
