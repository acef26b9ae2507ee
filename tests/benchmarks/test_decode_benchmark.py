"""benchmarks/decode_benchmark.py on a tiny image: report structure, stdout is JSON only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from archive_tools.dicom_writer import ENCODINGS
from beam_pipelines.dicom.reduced import j2k_available
from tests.support.benchmarks import loaded_script

_NAME = "decode_benchmark"
_TINY = ["--rows", "64", "--cols", "48", "--repeats", "1"]


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with loaded_script(_NAME) as module:
        yield module


def test_run_reports_every_encoding(bench: ModuleType, tmp_path: Path) -> None:
    report = bench.run([*_TINY, "--workdir", str(tmp_path)])

    assert set(report) >= {"machine", "image", "repeats", "results"}
    assert report["image"] == {"rows": 64, "cols": 48, "bits": 12}
    assert report["repeats"] == 1
    assert {"cpu_count", "python", "numpy", "pydicom"} <= set(report["machine"])

    expected = [*bench.DEFAULT_ENCODINGS, bench.WINDOW_VARIANT]
    assert [r["encoding"] for r in report["results"]] == expected
    for result in report["results"]:
        name = result["encoding"]
        encoding = "explicit_le" if name == bench.WINDOW_VARIANT else name
        assert result["transfer_syntax"] == str(ENCODINGS[encoding])
        assert result["file_bytes"] > 0
        assert (tmp_path / f"{name}.dcm").is_file()
        for key in ("bare_pydicom_ms", "decode_ms", "resize_ms", "model_input_ms"):
            assert result[key]["median"] > 0
            assert 0 < result[key]["min"] <= result[key]["median"]
        assert result["ratio"] > 0
        assert result["bits_stored"] == (8 if name == "jpeg_baseline" else 12)
        # Codec for codec: bare pydicom is also timed with our plugin when its default differs.
        if result["our_plugin"] != result["pydicom_plugin"]:
            assert result["bare_same_plugin_ms"]["median"] > 0
            assert result["within_target"] == (result["ratio_same_plugin"] <= bench.TARGET_RATIO)
        else:
            assert "bare_same_plugin_ms" not in result
    plugins = {r["encoding"]: r["our_plugin"] for r in report["results"]}
    assert plugins["explicit_le"] == "" and plugins["j2k"] == "pylibjpeg"

    window = report["results"][-1]
    assert window["photometric"] == "MONOCHROME1"
    assert window["voi_used"] == "window"
    assert window["inverted"] is True
    json.dumps(report)  # JSON-ready throughout


def test_main_prints_only_json(
    bench: ModuleType, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bench.main([*_TINY, "--encodings", "explicit_le", "--workdir", str(tmp_path)])

    report = json.loads(capsys.readouterr().out)
    assert [r["encoding"] for r in report["results"]] == ["explicit_le", bench.WINDOW_VARIANT]


def test_rejects_unknown_encoding(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.run([*_TINY, "--encodings", "webp"])


@pytest.mark.skipif(not j2k_available(), reason="glymur or OpenJPEG 2.3+ not installed")
def test_reduced_resolution_is_timed_against_the_full_path(
    bench: ModuleType, tmp_path: Path
) -> None:
    args = ["--rows", "600", "--cols", "500", "--repeats", "1", "--encodings", "j2k,jpeg_baseline"]
    report = bench.run([*args, "--workdir", str(tmp_path)])

    by_name = {r["encoding"]: r for r in report["results"]}
    assert "model_input" not in by_name[bench.WINDOW_VARIANT]
    expected = {"j2k": ("j2k_reduced", 2), "jpeg_baseline": ("jpeg_scaled", 2)}
    for name, (path, reduction) in expected.items():
        model_input = by_name[name]["model_input"]
        assert (model_input["fast_path"], model_input["reduction"]) == (path, reduction)
        assert model_input["decoded_shape"] == [300, 250]
        assert model_input["full_ms"]["median"] > 0 and model_input["fast_ms"]["median"] > 0
        assert model_input["fast_ratio"] > 0
        assert model_input["correlation"] > 0.99
