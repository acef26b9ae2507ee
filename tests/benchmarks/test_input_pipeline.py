"""benchmarks/input_pipeline.py on the shared tiny shards: report structure, stdout is JSON only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.benchmarks import loaded_script

_NAME = "input_pipeline"
_TINY = [
    "--batches",
    "2",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--global_batch_size",
    "4",
    "--models",
    "simple_cnn",
]


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with loaded_script(_NAME) as module:
        yield module


@pytest.mark.slow
def test_main_prints_one_json_report(
    bench: ModuleType, preprocessed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench.main([*_TINY, "--data_dir", str(preprocessed)])

    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"machine", "settings", "data", "target_ratio", "input", "models"}
    assert report["machine"]["cpus_usable"] >= 1
    assert report["settings"]["global_batch_size"] == 4
    assert report["settings"]["models"] == ["simple_cnn"]
    assert report["data"]["synthetic"] is False
    assert report["data"]["data_dir"] == str(preprocessed)
    assert report["data"]["shards"] >= 1
    for key in ("input", "input_no_augment"):
        assert report[key]["images_per_s"] > 0
        assert len(report[key]["rounds"]) == 1

    [result] = report["models"]
    assert result["model"] == "simple_cnn"
    assert result["parameters"] > 0
    assert result["train"]["images_per_s"] > 0
    assert result["train"]["ms_per_step"] > 0
    expected = report["input"]["images_per_s"] / result["train"]["images_per_s"]
    assert result["ratio"] == pytest.approx(expected, rel=0.01)
    assert result["within_target"] is (result["ratio"] >= report["target_ratio"])


@pytest.mark.parametrize(
    "flags", [["--models", "vgg16"], ["--batches", "0"], ["--image_size", "big"]]
)
def test_rejects_bad_flags(bench: ModuleType, flags: list[str]) -> None:
    with pytest.raises(SystemExit):
        bench.run(flags)
