"""A fast, vectorized chest-radiograph phantom with an optional learnable finding.

The phantom is a display image (float32 in [0, 1], higher = brighter): air
outside the body, soft tissue with lateral falloff, dark lung fields bounded
below by diaphragm domes, a bright mediastinum, spine and heart, ribs,
clavicles, smooth low-frequency variation and noise. An abnormal image adds
one to three textured consolidation-like opacities inside a lung field.
Sizes of findings are relative to the image, so the signal survives resizing
to 224x224.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

FRONTAL_VIEWS = frozenset({"PA", "AP"})


def _soft_inside(dist: np.ndarray, edge: float) -> np.ndarray:
    """Soft indicator of ``dist < 1`` (dist is a normalized ellipse radius)."""
    # A clipped linear ramp is ~5x cheaper than tanh and looks the same after noise.
    return np.clip((1.0 - dist) / edge + 0.5, 0.0, 1.0)


def _ellipse(
    X: np.ndarray, Y: np.ndarray, cx: float, cy: float, rx: float, ry: float
) -> np.ndarray:
    return np.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2)


def chest_phantom(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    *,
    abnormal: bool,
    view: str = "PA",
    anatomy: np.random.Generator | None = None,
) -> np.ndarray:
    """Draws one chest radiograph phantom.

    Args:
        rng: Random source for this image (pose, noise, findings).
        rows: Image height in pixels.
        cols: Image width in pixels.
        abnormal: Whether to add a finding (opacities in a lung field).
        view: ``PA``/``AP`` (frontal) or ``LATERAL``/``LL`` (lateral).
        anatomy: Optional random source for per-patient anatomy, so images of
            one patient look alike; ``rng`` is used when None.

    Returns:
        float32 array (rows, cols) in [0, 1], higher = brighter.
    """
    anat = anatomy if anatomy is not None else rng
    # Drawn whether or not it is used, so a normal and an abnormal image from the
    # same seed are identical except for the finding.
    finding_rng = np.random.default_rng(int(rng.integers(2**63)))
    lung_w = anat.uniform(0.26, 0.33)
    lung_h = anat.uniform(0.28, 0.35)
    body_w = anat.uniform(0.82, 0.95)
    heart_w = anat.uniform(0.22, 0.30)

    # Normalized coordinates: x in [-1, 1] across, y in [0, 1] down, with a pose jitter.
    scale = rng.uniform(0.92, 1.08)
    x = (np.arange(cols, dtype=np.float32) + 0.5) / cols * 2 - 1 - rng.uniform(-0.05, 0.05)
    y = (np.arange(rows, dtype=np.float32) + 0.5) / rows - rng.uniform(-0.04, 0.04)
    X = (x / scale)[None, :]
    Y = ((y - 0.5) / scale + 0.5)[:, None]

    body = _soft_inside(_ellipse(X, Y, 0.0, 0.62, body_w, 0.72), 0.08)
    # Thicker tissue in the middle attenuates more: brighter centre, darker flanks.
    img = 0.04 + body * (0.36 + 0.16 * (1.0 - np.minimum(X * X, 1.0)))

    frontal = view in FRONTAL_VIEWS
    if frontal:
        lungs = []
        for side, dome_shift in ((-1.0, -0.02), (1.0, 0.02)):
            cx = side * (0.40 + 0.02 * anat.standard_normal())
            cy = 0.44
            dome = 0.70 + dome_shift + 0.09 * ((X - cx) / lung_w) ** 2
            inside = _soft_inside(_ellipse(X, Y, cx, cy, lung_w, lung_h), 0.10)
            lungs.append(inside * np.clip((dome - Y) / 0.03 + 0.5, 0.0, 1.0))
        lung = np.maximum(lungs[0], lungs[1])
        lung_boxes = [(-0.40, 0.44), (0.40, 0.44)]
        img -= 0.30 * lung
        # Mediastinum and spine: a bright central band, brighter vertebrae.
        ax = np.abs(X)
        band = np.clip((0.14 - ax) / 0.04 + 0.5, 0.0, 1.0) * np.clip((Y - 0.06) / 0.05, 0.0, 1.0)
        img += 0.18 * band
        spine = np.clip((0.06 - ax) / 0.02 + 0.5, 0.0, 1.0)
        vertebrae = 0.8 + 0.2 * np.cos(Y * (2 * np.pi * 14.0))
        img += 0.12 * spine * vertebrae
        heart = _soft_inside(_ellipse(X, Y, 0.10, 0.62, heart_w, 0.17), 0.5)
        img += 0.13 * heart
        # Posterior ribs: arcs falling laterally, visible mostly over the lungs.
        phase = (Y + 0.22 * X * X) * (2 * np.pi * anat.uniform(9.0, 11.0))
        ribs = np.clip(np.cos(phase) - 0.3, 0.0, None)
        img += 0.08 * ribs * (0.3 + 0.7 * lung)
        # Clavicles: two oblique bright bars near the top.
        for side in (-1.0, 1.0):
            line = 0.17 - 0.10 * (side * X - 0.05)
            dist = np.abs(Y - line)
            along = np.clip((0.27 - np.abs(X - side * 0.38)) / 0.05, 0.0, 1.0)
            img += 0.14 * np.clip((0.025 - dist) / 0.01 + 0.5, 0.0, 1.0) * along
    else:
        cx, cy = -0.05, 0.45
        lung = _soft_inside(_ellipse(X, Y, cx, cy, 0.55, lung_h + 0.02), 0.12)
        lung *= np.clip((0.72 + 0.05 * X - Y) / 0.03 + 0.5, 0.0, 1.0)
        lung_boxes = [(cx, cy)]
        img -= 0.26 * lung
        spine = np.clip((0.10 - np.abs(X - 0.62)) / 0.03 + 0.5, 0.0, 1.0)
        img += 0.20 * spine * (0.8 + 0.2 * np.cos(Y * (2 * np.pi * 12.0)))
        img += 0.12 * _soft_inside(_ellipse(X, Y, -0.32, 0.62, 0.30, 0.18), 0.5)

    if abnormal:
        img += _opacities(finding_rng, X, Y, lung, lung_boxes, frontal, lung_w, lung_h)

    # Smooth, low-frequency exposure variation (separable, so cheap).
    kx, ky = rng.uniform(0.5, 2.0, size=2)
    px, py = rng.uniform(0, 2 * np.pi, size=2)
    img += 0.025 * np.cos(kx * np.pi * X + px) * np.cos(ky * np.pi * Y + py)

    gamma = rng.uniform(0.85, 1.15)
    np.clip(img, 0.0, 1.0, out=img)
    img **= np.float32(gamma)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0.008, 0.02))
    np.clip(img, 0.0, 1.0, out=img)
    return img.astype(np.float32, copy=False)


def _opacities(
    rng: np.random.Generator,
    X: np.ndarray,
    Y: np.ndarray,
    lung: np.ndarray,
    lung_centres: list[tuple[float, float]],
    frontal: bool,
    lung_w: float,
    lung_h: float,
) -> np.ndarray:
    """One to three textured, blob-shaped opacities restricted to the lung fields."""
    out = np.zeros(lung.shape, dtype=np.float32)
    n = int(rng.choice([1, 1, 2, 3]))
    side_idx = int(rng.integers(len(lung_centres)))
    for _ in range(n):
        cx0, cy0 = lung_centres[side_idx if rng.random() < 0.8 else rng.integers(len(lung_centres))]
        span_x = lung_w * 0.6 if frontal else 0.35
        cx = cx0 + rng.uniform(-span_x, span_x)
        cy = cy0 + rng.uniform(-0.4, 0.9) * lung_h * 0.6
        rx = rng.uniform(0.07, 0.15)
        ry = rx * rng.uniform(0.6, 1.2)
        amp = rng.uniform(0.14, 0.26)
        d2 = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2
        blob = np.exp(-0.5 * np.minimum(d2, 30.0))
        # Patchy air-bronchogram-like texture keeps the finding from being a clean disc.
        fx, fy = rng.uniform(12.0, 25.0, size=2)
        ph = rng.uniform(0, 2 * np.pi, size=2)
        texture = 0.75 + 0.25 * np.cos(fx * X + ph[0]) * np.cos(fy * Y + ph[1])
        out += (amp * blob * texture).astype(np.float32)
    return out * (0.25 + 0.75 * lung)
