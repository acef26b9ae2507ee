"""The console scripts (pyproject's ``[project.scripts]``): the terminal first, then the job.

A job's module imports Beam or TensorFlow, which log while they load (to a
handler Python would otherwise add to the terminal on the spot). Those
records wait in memory until the job's console
(:mod:`beam_pipelines.console`) sends them to its log file, so the terminal
stays quiet. Each job module keeps its own ``main()`` for ``python -m``.
"""

from __future__ import annotations

import importlib
import logging
import logging.handlers

#: Records held until the console names their destination (then flushed there).
_HELD_RECORDS = 10_000


def _launch(module: str) -> None:
    held = logging.handlers.MemoryHandler(_HELD_RECORDS, flushLevel=logging.CRITICAL + 1)
    logging.getLogger().addHandler(held)
    importlib.import_module(module).main()


def index() -> None:
    """``xray-index``."""
    _launch("beam_pipelines.index")


def preprocess() -> None:
    """``xray-preprocess``."""
    _launch("beam_pipelines.preprocess")


def score() -> None:
    """``xray-score``."""
    _launch("beam_pipelines.score")


def train() -> None:
    """``xray-train``."""
    _launch("trainer.train")


def analyze() -> None:
    """``xray-analyze``."""
    _launch("analysis.analyze")


def explain() -> None:
    """``xray-explain``."""
    _launch("explain.explain")
