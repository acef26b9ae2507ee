"""Fixtures shared by every job's tests: a small synthetic archive and its shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from archive_tools import synth
from tests.support.runners import LOCAL_RUNNER


@pytest.fixture(scope="session")
def synthetic_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic archive (24 patients, tiny images) with all 8 broken-row kinds."""
    root = tmp_path_factory.mktemp("archive") / "archive"
    synth.run(
        [
            "--output_dir",
            str(root),
            "--patients",
            "24",
            "--seed",
            "3",
            "--min_size",
            "48",
            "--max_size",
            "96",
            "--broken",
            "8",
            "--workers",
            "1",
        ]
    )
    return root


@pytest.fixture(scope="session")
def preprocessed(synthetic_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """synthetic_archive preprocessed into shards (local in-memory runner)."""
    from beam_pipelines import preprocess

    out = tmp_path_factory.mktemp("preprocessed")
    preprocess.run(
        [
            "--metadata",
            str(synthetic_archive / "metadata.csv"),
            "--output_dir",
            str(out),
            *LOCAL_RUNNER,
        ]
    )
    return out


@pytest.fixture(scope="session")
def trained_model(preprocessed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quickly trained simple CNN on `preprocessed` (RESULTS folder)."""
    from trainer import train

    out = tmp_path_factory.mktemp("results")
    train.run(
        [
            "--data_dir",
            str(preprocessed),
            "--output_dir",
            str(out),
            "--epochs",
            "1",
            "--steps_per_epoch",
            "2",
            "--global_batch_size",
            "8",
            "--verbose",
            "0",
        ]
    )
    return out
