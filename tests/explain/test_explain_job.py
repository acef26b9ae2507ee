"""xray-explain end to end on the tiny trained model, and its gallery in xray-analyze's report."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import analyze
from beam_pipelines.contracts import gallery, operating_point
from explain import explain


@pytest.fixture(scope="module")
def explained(trained_model: Path, preprocessed: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("explain") / "explain"
    document = explain.run(
        [
            "--model",
            str(trained_model / "model"),
            "--predictions",
            str(trained_model / "predictions" / "test.parquet"),
            "--data_dir",
            str(preprocessed),
            "--output_dir",
            str(out),
            "--per_group",
            "2",
        ]
    )
    return out, document


def test_the_gallery_shows_each_group_the_split_has(explained, trained_model: Path) -> None:
    out, document = explained
    assert document == gallery.read(str(out))
    test = pd.read_parquet(trained_model / "predictions" / "test.parquet")
    (point,) = operating_point.from_footers([str(trained_model / "predictions" / "test.parquet")])
    assert document["threshold"] == point["threshold"]  # the model's, by default
    assert document["threshold_source"] == "model operating point (youden, chosen on validation)"
    called = test["score"] >= point["threshold"]
    expected = {
        "false_positive": int(((test["label"] == 0) & called).sum()),
        "false_negative": int(((test["label"] == 1) & ~called).sum()),
        "true_positive": int(((test["label"] == 1) & called).sum()),
        "true_negative": int(((test["label"] == 0) & ~called).sum()),
    }
    assert {g: c["available"] for g, c in document["groups"].items()} == expected
    for group, count in expected.items():
        listed = [image for image in document["images"] if image["group"] == group]
        assert len(listed) == min(count, 2) == document["groups"][group]["shown"]
    assert document["images"], "the split has images of at least one group"
    scores = dict(zip(test["dicom_path"], test["score"], strict=True))
    for image in document["images"]:
        assert image["score"] == pytest.approx(scores[image["dicom_path"]])
        assert image["predicted"] == int(image["score"] >= point["threshold"])
        with Image.open(out / image["file"]) as picture:
            assert picture.format == "PNG" and picture.size == (2 * 224 + 4, 224)
            pixels = np.asarray(picture.convert("RGB"), dtype=int)
        overlay = pixels[:, 228:]
        assert (np.abs(overlay[..., 0] - overlay[..., 2]) > 40).mean() > 0.005, "no heat shown"
    assert document["layers"][0].startswith("activation")
    assert document["split"] == "test" and document["model_id"] == test["model_id"][0]


def test_the_report_embeds_the_gallery(explained, trained_model: Path, tmp_path: Path) -> None:
    out, document = explained
    report_dir = tmp_path / "analysis"
    metrics = analyze.run(
        [
            "--predictions",
            str(trained_model / "predictions" / "*.parquet"),
            "--output_dir",
            str(report_dir),
            "--history",
            str(trained_model / "history.csv"),
            "--bootstrap",
            "20",
            "--gallery",
            str(out),
        ]
    )
    files = [image["file"] for image in document["images"]]
    assert metrics["gallery"] == {
        "dir": str(out),
        "split": "test",
        "threshold": document["threshold"],
        "files": files,
    }
    assert json.loads((report_dir / "metrics.json").read_text())["gallery"]["files"] == files
    text = (report_dir / "report.html").read_text()
    assert "Example cases" in text and "Grad-CAM" in text
    plots = len(list((report_dir / "plots").glob("*.png")))
    assert text.count("data:image/png;base64,") == plots + len(files)
    for image in document["images"]:
        assert image["file"] in text and f"score <b>{image['score']:.3f}</b>" in text
        assert image["dicom_path"] in text
    for group in gallery.GROUPS:
        assert gallery.TITLES[group] in text
    _screenshot(report_dir / "report.html", tmp_path)


def _screenshot(report: Path, tmp_path: Path) -> None:
    """Renders the report in headless Chromium (when installed) and checks it is not blank."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return
    shot = tmp_path / "report_with_gallery.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,6000",
            f"--screenshot={shot}",
            report.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    # Jet's greens and cyans are the heat maps': the plots draw in blue, orange and grey
    # (0 such pixels in the same report without a gallery).
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((green > red + 30) & (green > blue + 30)).mean() > 0.0005


def test_another_model_is_refused_its_images(
    trained_model: Path, preprocessed: Path, tmp_path: Path
) -> None:
    from trainer import models

    other = tmp_path / "model"
    other.mkdir()
    model = models.build_model("simple_cnn", pixel_mean=0.9, pixel_std=0.01)
    model.save(other / "model.keras")
    arguments = [
        "--model",
        str(other),
        "--predictions",
        str(trained_model / "predictions" / "test.parquet"),
        "--data_dir",
        str(preprocessed),
        "--output_dir",
        str(tmp_path / "out"),
        "--threshold",
        "0.5",
    ]
    with pytest.raises(ValueError, match="is --model the model that made them"):
        explain.run(arguments)
    assert not (tmp_path / "out" / gallery.FILE).exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--per_group": "0"}, "--per_group must be >= 1"),
        ({"--threshold": "1.5"}, "--threshold must be a score"),
        ({"--data_dir": "nowhere"}, "manifest.json"),
        ({"--split": "train"}, "no labelled rows of split 'train'"),
    ],
)
def test_bad_inputs_are_refused_before_any_work(
    change: dict[str, str],
    message: str,
    trained_model: Path,
    preprocessed: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = {
        "--model": str(trained_model / "model"),
        "--predictions": str(trained_model / "predictions" / "test.parquet"),
        "--data_dir": str(preprocessed),
        "--output_dir": str(tmp_path / "out"),
        "--threshold": "0.5",
        **change,
    }
    with pytest.raises(SystemExit) as stopped:
        explain.run([part for pair in flags.items() for part in pair])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_choose_picks_confident_errors_and_typical_cases() -> None:
    rows = [  # (label, score)
        *[(0, s) for s in (0.05, 0.1, 0.2, 0.35, 0.45, 0.6, 0.9, 0.7)],
        *[(1, s) for s in (0.45, 0.1, 0.3, 0.55, 0.62, 0.7, 0.9, 0.95)],
    ]
    frame = pd.DataFrame(
        {
            "dicom_path": [f"p{i}.dcm" for i in range(len(rows))],
            "patient_id": ["P2" if i == 1 else f"P{i}" for i in range(len(rows))],
            "view_position": [None if i == 6 else "PA" for i in range(len(rows))],
            "label": [label for label, _ in rows],
            "score": [score for _, score in rows],
        }
    )
    chosen, available = explain.choose(frame, threshold=0.5, per_group=2)
    assert available == {
        "false_positive": 3,
        "false_negative": 3,
        "true_positive": 5,
        "true_negative": 5,
    }
    by_group = {
        group: [row["score"] for row in chosen if row["group"] == group] for group in gallery.GROUPS
    }
    assert by_group["false_positive"] == [0.9, 0.7]  # most confident first
    assert by_group["false_negative"] == [0.1, 0.3]
    # Nearest the median 0.2: 0.2 (P2), then 0.1, but that is P2's too: 0.35 first.
    assert by_group["true_negative"] == [0.2, 0.35]
    assert by_group["true_positive"] == [0.7, 0.62]  # nearest the median 0.7
    assert [row["rank"] for row in chosen] == [1, 2] * 4
    assert {row["predicted"] for row in chosen if row["group"].startswith("false_p")} == {1}
    first = chosen[0]  # p6: score 0.9, normal, no view
    assert first["view_position"] is None and first["patient_id"] == "P6"


def test_the_gallery_index_round_trips_and_names_what_is_missing(tmp_path: Path) -> None:
    image = {
        "group": "false_negative",
        "rank": 1,
        "file": gallery.image_file("false_negative", 1),
        "score": 0.1,
        "label": 1,
        "predicted": 0,
        "view_position": "AP",
        "patient_id": "P1",
        "dicom_path": "a.dcm",
    }
    document = gallery.build("test", 0.4, "--threshold", "m", ["conv"], None, {}, [image])
    assert document["groups"]["false_negative"] == {"available": 0, "shown": 1}
    gallery.write(str(tmp_path), document)
    with pytest.raises(ValueError, match="false_negative_1.png, which is missing"):
        gallery.read(str(tmp_path))
    (tmp_path / "gallery").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / image["file"])
    assert gallery.read(str(tmp_path)) == document
    with pytest.raises(ValueError, match="cannot be read"):
        gallery.read(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown gallery group"):
        gallery.image_file("maybe", 1)
