"""A [0, 1] image to the square model input: aspect kept (pad) or not (stretch)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from beam_pipelines.contracts.records import IMAGE_SIZE

#: Side of the square model input, in pixels (the record contract's image size).
MODEL_INPUT_SIZE = IMAGE_SIZE
# Pillow's resize box-averages by an integer factor down to within this
# factor of the target, then filters.
_REDUCING_GAP = 2.0
ResizePolicy = Literal["pad", "stretch"]


def content_shape(
    rows: int, cols: int, size: int = MODEL_INPUT_SIZE, policy: ResizePolicy = "pad"
) -> tuple[int, int]:
    """(rows, cols) an image of that size occupies in the model input, before padding."""
    if policy == "stretch":
        return (size, size)
    scale = size / max(rows, cols)
    return (max(1, round(rows * scale)), max(1, round(cols * scale)))


def to_model_input(
    image: np.ndarray,
    size: int = MODEL_INPUT_SIZE,
    policy: ResizePolicy = "pad",
    shape: tuple[int, int] | None = None,
    reduction: int = 1,
) -> np.ndarray:
    """Resizes a [0,1] image to the model input, ``(size, size, 1)`` float32.

    Policy ``"pad"`` (the default) keeps the aspect ratio: the longer side
    becomes ``size`` and the shorter is centred and padded with 0 (black, the
    display value of air), so anatomy is never stretched differently for
    different detector shapes. ``"stretch"`` resizes each axis independently
    (what most ImageNet-style code does). Both shrink with Pillow: a box
    average by an integer factor down to within 2x of the target, then its
    antialiased bilinear filter (``reducing_gap=2``): area-like, no overshoot
    outside [0, 1].

    ``shape`` is the (rows, cols) of the full image when ``image`` is a
    reduced-resolution decode of it, each side divided by ``reduction``
    (rounded up), so the output geometry is the full image's to the pixel:
    the resize reads the box of the reduced image that the full one maps to.

    Preprocessing and scoring both call this, so they cannot drift.
    """
    from PIL import Image

    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if policy not in ("pad", "stretch"):
        raise ValueError(f"policy must be 'pad' or 'stretch', not {policy!r}")
    rows, cols = image.shape
    full_rows, full_cols = shape or (rows, cols)
    target = content_shape(full_rows, full_cols, size, policy)
    box = None
    if reduction > 1:
        box = (0.0, 0.0, full_cols / reduction, full_rows / reduction)
    pixels = np.ascontiguousarray(image, dtype=np.float32)
    source = Image.frombuffer("F", (cols, rows), pixels, "raw", "F", 0, 1)
    # reducing_gap: box-average by an integer factor first, then the
    # bilinear filter over the last < 2x: ~3x faster than filtering all the
    # way down, and still antialiased. (decode_model_input does that first
    # box average itself, while mapping the pixels: box_factor.)
    resized = np.asarray(
        source.resize(
            (target[1], target[0]), Image.Resampling.BILINEAR, box, reducing_gap=_REDUCING_GAP
        ),
        dtype=np.float32,
    )
    out = np.zeros((size, size, 1), dtype=np.float32)
    top, left = (size - target[0]) // 2, (size - target[1]) // 2
    out[top : top + target[0], left : left + target[1], 0] = np.clip(resized, 0.0, 1.0)
    return out


def box_factor(rows: int, cols: int, size: int, policy: ResizePolicy) -> int:
    """The integer box reduction :func:`to_model_input` starts with (Pillow's
    ``reducing_gap=2``), when equal on both axes; else 1."""
    target_rows, target_cols = content_shape(rows, cols, size, policy)
    factor_x = int(cols / target_cols / _REDUCING_GAP) or 1
    factor_y = int(rows / target_rows / _REDUCING_GAP) or 1
    return factor_x if factor_x == factor_y else 1
