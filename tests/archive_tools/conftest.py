"""Shared fixtures for archive_tools tests."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def smooth_display() -> np.ndarray:
    """A small, smooth display image in [0, 1] covering the full range (odd size on purpose)."""
    rows, cols = 45, 63
    y = np.linspace(0.0, 1.0, rows)[:, None]
    x = np.linspace(0.0, 1.0, cols)[None, :]
    image = 0.5 * x + 0.3 * y + 0.2 * np.sin(6 * x * y)
    image -= image.min()
    return image / image.max()
