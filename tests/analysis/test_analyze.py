"""End to end: xray-analyze on prediction files: metrics.json, plots, report."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis import analyze, plots
from beam_pipelines.contracts import gallery, predictions


@pytest.fixture(scope="module")
def prediction_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("predictions")
    rng = np.random.default_rng(0)
    for split, patients in (("validation", 40), ("test", 60)):
        rows = {
            k: []
            for k in (
                "dicom_path",
                "patient_id",
                "study_id",
                "view_position",
                "age",
                "sex",
                "split",
                "label",
                "score",
                "model_id",
            )
        }
        for p in range(patients):
            label = int(rng.integers(0, 2))
            for image in range(2):
                rows["dicom_path"].append(f"{split}/p{p}/{image}.dcm")
                rows["patient_id"].append(f"{split}-p{p}")
                rows["study_id"].append("S1")
                rows["view_position"].append(["PA", "AP", "LATERAL"][p % 3])
                rows["age"].append(int(rng.integers(20, 90)) if p % 7 else None)
                rows["sex"].append(["M", "F"][p % 2])
                rows["split"].append(split)
                rows["label"].append(label)
                rows["score"].append(float(1 / (1 + np.exp(-rng.normal(2 * label - 1, 1)))))
                rows["model_id"].append("simple_cnn-test")
        predictions.write(str(folder / f"{split}.parquet"), rows)
    (folder / "history.csv").write_text(
        "epoch,auc,loss,val_auc,val_loss\n0,0.6,0.7,0.62,0.69\n1,0.7,0.6,0.71,0.62\n"
    )
    return folder


@pytest.fixture(scope="module")
def analysed(prediction_files: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("analysis")
    analyze.run(
        [
            "--predictions",
            str(prediction_files / "*.parquet"),
            "--output_dir",
            str(out),
            "--history",
            str(prediction_files / "history.csv"),
            "--bootstrap",
            "100",
        ]
    )
    return out


def test_metrics_document(analysed: Path) -> None:
    document = json.loads((analysed / "metrics.json").read_text())
    assert document["split"] == "test" and document["threshold"]["chosen_on"] == "validation"
    headline = document["metrics"]
    assert headline["n"] == 120 and headline["patients"] == 60
    low, high = headline["ci95"]["auc"]
    assert low < headline["roc_auc"] < high
    assert {r["attribute"] for r in document["subgroups"]} == {"sex", "age_band", "view_position"}
    assert document["leakage"] == {"checked": True, "patients_in_several_splits": 0}
    assert "gallery" not in document  # only with --gallery


def test_every_plot_is_written_and_not_blank(analysed: Path) -> None:
    names = {
        "history",
        "roc",
        "precision_recall",
        "confusion_matrix",
        "reliability",
        "score_distributions",
        "subgroup_auc",
    }
    assert {p.stem for p in (analysed / "plots").glob("*.png")} == names
    for path in (analysed / "plots").glob("*.png"):
        image = np.asarray(Image.open(path).convert("L"), dtype=float)
        assert min(image.shape) > 300, path
        assert image.std() > 10, f"{path} looks blank"


def test_report_is_self_contained(analysed: Path) -> None:
    text = (analysed / "report.html").read_text()
    assert text.count("data:image/png;base64,") == 7
    assert "simple_cnn-test" in text and "Subgroups" in text
    assert 'src="http' not in text


def test_the_history_plot_is_full_width(analysed: Path) -> None:
    text = (analysed / "report.html").read_text()
    assert '<figure class="wide"><img alt="Training history"' in text
    assert "figure.wide img { width: 100%; max-width: 100%; }" in text
    assert text.count('<figure class="wide">') == 1


def test_forest_axis_reaches_past_every_interval() -> None:
    low, high = plots.forest_limits([0.42, 0.73, 1.0, 0.5])
    assert low < 0.42 and 1.0 < high <= 1.02
    low, high = plots.forest_limits([0.0, 0.3])
    assert -0.02 <= low < 0.0 and high > 0.3


def _gallery(folder: Path, split: str = "test", pseudonymized: str | None = "f00d") -> Path:
    """A gallery folder as xray-explain writes it: two images, PNGs of flat colours."""
    images = []
    for group, score, label, predicted in (
        ("false_positive", 0.93, 0, 1),
        ("true_negative", 0.12, 0, 0),
    ):
        image = {
            "group": group,
            "rank": 1,
            "file": gallery.image_file(group, 1),
            "score": score,
            "label": label,
            "predicted": predicted,
            "view_position": "PA",
            "patient_id": f"pseudo-{group}",
            "dicom_path": f"{group}.dcm",
        }
        (folder / gallery.FOLDER).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (452, 224), (200, 40, 40)).save(folder / image["file"])
        images.append(image)
    available = {"false_positive": 5, "true_negative": 9}
    document = gallery.build(
        split, 0.61, "model operating point", "m", ["relu"], pseudonymized, available, images
    )
    gallery.write(str(folder), document)
    return folder


def test_report_shows_the_gallery(prediction_files: Path, tmp_path: Path) -> None:
    folder = _gallery(tmp_path / "explain")
    document = analyze.run(
        [
            "--predictions",
            str(prediction_files / "*.parquet"),
            "--output_dir",
            str(tmp_path / "out"),
            "--bootstrap",
            "0",
            "--gallery",
            str(folder),
        ]
    )
    assert document["gallery"] == {
        "dir": str(folder),
        "split": "test",
        "threshold": 0.61,
        "files": ["gallery/false_positive_1.png", "gallery/true_negative_1.png"],
    }
    text = (tmp_path / "out" / "report.html").read_text()
    assert text.count("data:image/png;base64,") == 6 + 2
    assert "Most confident false positives <small>(1 of 5 in the split)</small>" in text
    assert "Most confident false negatives <small>(0 of 0 in the split)</small>" in text
    assert "score <b>0.930</b> · label normal · called abnormal · view PA" in text
    assert "pseudo-false_positive" in text and "true_negative.dcm" in text
    assert "Patient ids and paths are pseudonyms (key f00d)" in text
    assert not any("gallery" in warning for warning in document["warnings"])


def test_a_gallery_of_another_split_is_flagged(prediction_files: Path, tmp_path: Path) -> None:
    folder = _gallery(tmp_path / "explain", split="validation", pseudonymized=None)
    document = analyze.run(
        [
            "--predictions",
            str(prediction_files / "*.parquet"),
            "--output_dir",
            str(tmp_path / "out"),
            "--bootstrap",
            "0",
            "--gallery",
            str(folder),
        ]
    )
    assert any("gallery shows the validation split" in w for w in document["warnings"])
    text = (tmp_path / "out" / "report.html").read_text()
    assert "the archive's own (the data was not pseudonymized)" in text


def test_a_broken_gallery_is_refused(
    prediction_files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _gallery(tmp_path / "explain")
    (folder / gallery.image_file("true_negative", 1)).unlink()
    with pytest.raises(SystemExit) as stopped:
        analyze.run(
            [
                "--predictions",
                str(prediction_files / "*.parquet"),
                "--output_dir",
                str(tmp_path / "out"),
                "--gallery",
                str(folder),
            ]
        )
    assert stopped.value.code == 2
    assert "true_negative_1.png, which is missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_report_renders_in_chromium(analysed: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run installs it)")
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,2400",
            f"--screenshot={shot}",
            (analysed / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    # Plots are coloured; an unrendered page would be black text on white only.
    coloured = np.abs(pixels[..., 0] - pixels[..., 2]) > 40
    assert coloured.mean() > 0.01


def test_leakage_is_flagged(prediction_files: Path, tmp_path: Path) -> None:
    table = predictions.read(str(prediction_files / "test.parquet")).to_pydict()
    table["split"] = ["validation"] + table["split"][1:]  # one image of a test patient
    predictions.write(str(tmp_path / "leaky.parquet"), table)
    document = analyze.run(
        [
            "--predictions",
            str(tmp_path / "leaky.parquet"),
            "--output_dir",
            str(tmp_path / "out"),
            "--bootstrap",
            "0",
        ]
    )
    assert document["leakage"]["patients_in_several_splits"] > 0
    assert any("LEAKAGE" in w for w in document["warnings"])


def test_bad_arguments_exit(tmp_path: Path, prediction_files: Path) -> None:
    with pytest.raises(SystemExit):
        analyze.run(["--predictions", str(tmp_path / "none*.parquet"), "--output_dir", "x"])
    with pytest.raises(SystemExit):
        analyze.run(
            [
                "--predictions",
                str(prediction_files / "test.parquet"),
                "--output_dir",
                str(tmp_path),
                "--threshold",
                "median",
            ]
        )


def test_extra_columns_become_subgroups(prediction_files: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = predictions.read(str(prediction_files / "test.parquet"))
    sites = pa.array([["north", "south"][i % 2] for i in range(table.num_rows)])
    pq.write_table(table.append_column("site", sites), tmp_path / "test.parquet")
    document = analyze.run(
        [
            "--predictions",
            str(tmp_path / "test.parquet"),
            str(prediction_files / "validation.parquet"),
            "--output_dir",
            str(tmp_path / "out"),
            "--bootstrap",
            "0",
        ]
    )
    site_rows = [r for r in document["subgroups"] if r["attribute"] == "site"]
    assert {r["value"] for r in site_rows} == {"north", "south"}
    assert sum(r["n"] for r in site_rows) == document["metrics"]["n"]
