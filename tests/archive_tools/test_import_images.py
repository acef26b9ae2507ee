from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import DigitalXRayImageStorageForPresentation, SecondaryCaptureImageStorage

from archive_tools import import_images
from archive_tools.dicom_writer import ENCODINGS
from beam_pipelines.contracts.metadata import COLUMNS, format_dicom_age, parse_age, parse_sex
from tests.support.data import SHARED_DATA

NIH = SHARED_DATA / "cxr_nih_pneumonia_dev"


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _gray(seed: int, shape=(40, 56)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture
def class_folders(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """NORMAL/ and PNEUMONIA/ with grayscale PNG, grey RGB JPEG-free PNG and colour PNG."""
    root = tmp_path / "images"
    expected = {}
    for i, (folder, name, mode) in enumerate(
        [
            ("NORMAL", "person1_a.png", "L"),
            ("NORMAL", "person2_b.png", "RGB"),
            ("PNEUMONIA", "person1_c.png", "L"),
            ("PNEUMONIA", "person3_d.png", "L"),
        ]
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        gray = _gray(i)
        array = gray if mode == "L" else np.repeat(gray[..., None], 3, axis=2)
        Image.fromarray(array, mode=mode).save(root / folder / name)
        expected[f"{folder}/{name}"] = gray
    return root, expected


def test_folder_mode(class_folders, tmp_path):
    root, expected = class_folders
    out = tmp_path / "out"
    summary = import_images.run(
        ["--images_dir", str(root), "--output_dir", str(out), "--workers", "1",
         "--normal_classes", "normal", "--abnormal_classes", "pneumonia",
         "--patient_id_regex", r"^(person\d+)_"]
    )  # fmt: skip
    assert (summary.images, summary.errors, summary.abnormal, summary.exit_code) == (4, 0, 2, 0)
    columns, rows = _read_csv(out / "metadata.csv")
    assert tuple(columns[: len(COLUMNS)]) == COLUMNS
    assert [r["SourcePath"] for r in rows] == sorted(expected)
    assert [r["Abnormal"] for r in rows] == ["false", "false", "true", "true"]
    assert [r["PatientID"] for r in rows] == ["person1", "person2", "person1", "person3"]
    # One study per image, numbered per patient in input order.
    assert [r["StudyID"] for r in rows] == ["S0001", "S0001", "S0002", "S0001"]
    for row in rows:
        ds = pydicom.dcmread(out / row["DicomPath"])
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.Modality == "OT"
        assert (ds.BitsStored, ds.PhotometricInterpretation) == (8, "MONOCHROME2")
        assert ds.PatientID == row["PatientID"] and ds.StudyID == row["StudyID"]
        np.testing.assert_array_equal(ds.pixel_array, expected[row["SourcePath"]])
    _, errors = _read_csv(out / "import_errors.csv")
    assert errors == []


def test_csv_mode_extras_colour_and_errors(tmp_path):
    images = tmp_path / "data" / "imgs"
    images.mkdir(parents=True)
    gray = _gray(1)
    Image.fromarray(gray).save(images / "a.png")
    colour = np.random.default_rng(2).integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
    Image.fromarray(colour, mode="RGB").save(images / "b.jpg", quality=90)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(gray).save(images / "same_name.png")
    (images / "sub").mkdir()
    Image.fromarray(gray).save(images / "sub" / "same_name.png")
    labels = tmp_path / "data" / "labels.csv"
    labels.write_text(
        "path,label,patient_id,age,sex,view,study_id,site\n"
        "imgs/a.png,No Finding,p1,065Y,female,pa,,north\n"
        "imgs/b.jpg,POSITIVE,p2,40,M,AP,st9,south\n"
        "imgs/broken.png,0,p3,,,,,east\n"
        "imgs/missing.png,1,p3,,,,,east\n"
        "imgs/same_name.png,0,p4,abc,x,,,west\n"
        "imgs/sub/same_name.png,1,p4,,,,,west\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    summary = import_images.run(
        ["--labels_csv", str(labels), "--output_dir", str(out), "--workers", "2",
         "--modality", "DX", "--encoding", "j2k"]
    )  # fmt: skip
    assert (summary.inputs, summary.images, summary.errors) == (6, 4, 2)
    assert summary.error_reasons == {"missing_file": 1, "unreadable_image": 1}
    columns, rows = _read_csv(out / "metadata.csv")
    assert columns == [*COLUMNS, "site", "SourcePath", "SourceLabel"]
    first, second, third, fourth = rows
    assert (first["Age"], first["Sex"], first["ViewPosition"], first["Abnormal"]) == (
        "65", "F", "PA", "false",
    )  # fmt: skip
    assert (second["StudyID"], second["site"], second["SourceLabel"]) == (
        "st9",
        "south",
        "POSITIVE",
    )
    # A bad age or sex becomes unknown, not an error.
    assert (third["Age"], third["Sex"]) == ("", "")
    assert third["DicomPath"] == "raw/p4/same_name.dcm"
    assert fourth["DicomPath"] == "raw/p4/same_name_2.dcm"
    ds = pydicom.dcmread(out / first["DicomPath"])
    assert ds.SOPClassUID == DigitalXRayImageStorageForPresentation
    assert ds.file_meta.TransferSyntaxUID == ENCODINGS["j2k"]
    assert ds.PatientAge == format_dicom_age(65)
    np.testing.assert_array_equal(ds.pixel_array, gray)
    # Real colour becomes luminance.
    expected = np.asarray(Image.open(images / "b.jpg").convert("L"))
    np.testing.assert_array_equal(pydicom.dcmread(out / second["DicomPath"]).pixel_array, expected)
    columns, errors = _read_csv(out / "import_errors.csv")
    assert columns == ["path", "reason", "detail"]
    assert [(e["path"], e["reason"]) for e in errors] == [
        ("imgs/broken.png", "unreadable_image"),
        ("imgs/missing.png", "missing_file"),
    ]


def test_strict_exit_code(tmp_path):
    root = tmp_path / "images"
    (root / "normal").mkdir(parents=True)
    Image.fromarray(_gray(0)).save(root / "normal" / "ok.png")
    (root / "normal" / "bad.png").write_text("not an image")
    summary = import_images.run(["--images_dir", str(root), "--output_dir", str(tmp_path / "a")])
    assert (summary.images, summary.errors, summary.exit_code) == (1, 1, 0)
    strict = import_images.run(
        ["--images_dir", str(root), "--output_dir", str(tmp_path / "b"), "--strict"]
    )
    assert strict.exit_code == 1


def test_unknown_labels_fail_before_any_work(tmp_path, capsys):
    root = tmp_path / "images"
    for folder in ("normal", "cardiomegaly", "effusion"):
        (root / folder).mkdir(parents=True)
        Image.fromarray(_gray(0)).save(root / folder / "x.png")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as excinfo:
        import_images.run(["--images_dir", str(root), "--output_dir", str(out)])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "'cardiomegaly'" in err and "'effusion'" in err
    assert not out.exists()


def test_workers_do_not_change_output(class_folders, tmp_path):
    root, _ = class_folders
    outputs = []
    for workers in ("1", "3"):
        out = tmp_path / f"out{workers}"
        import_images.run(
            ["--images_dir", str(root), "--output_dir", str(out), "--workers", workers]
        )
        outputs.append(out)
    a, b = outputs
    assert (a / "metadata.csv").read_bytes() == (b / "metadata.csv").read_bytes()
    for path in (a / "raw").rglob("*.dcm"):
        assert path.read_bytes() == (b / path.relative_to(a)).read_bytes()


@pytest.mark.parametrize(
    "bad",
    [
        [],  # Neither --images_dir nor --labels_csv.
        ["--images_dir", "x", "--labels_csv", "y.csv"],
        ["--labels_csv", "nope.csv"],
        ["--images_dir", "x", "--encoding", "mpeg"],
        ["--images_dir", "x", "--patient_id_regex", "no_group"],
        ["--images_dir", "x", "--patient_id_regex", "(unclosed"],
        ["--images_dir", "x", "--normal_classes", "a", "--abnormal_classes", "a"],
        ["--images_dir", "x", "--workers", "0"],
    ],
)
def test_bad_arguments_exit_2(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    with pytest.raises(SystemExit) as excinfo:
        import_images.run(["--output_dir", str(tmp_path / "out"), *bad])
    assert excinfo.value.code == 2


def test_csv_without_label_column(tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,diagnosis\na.png,normal\n")
    with pytest.raises(SystemExit):
        import_images.run(["--labels_csv", str(labels), "--output_dir", str(tmp_path / "out")])
    assert "label" in capsys.readouterr().err


def test_sixteen_bit_png_is_scaled(tmp_path):
    wide = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    np.testing.assert_array_equal(import_images.load_grayscale_8bit(path), [[0, 1, 255, 128]])


@pytest.mark.real_data
@pytest.mark.skipif(not (NIH / "labels.csv").is_file(), reason="../shared/data not present")
def test_real_nih_images_roundtrip(tmp_path):
    with open(NIH / "labels.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        all_rows = list(reader)
        fields = reader.fieldnames or []
    subset = all_rows[:5] + all_rows[-5:]  # Both classes.
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(subset)
    out = tmp_path / "out"
    summary = import_images.run(
        ["--labels_csv", str(labels), "--images_root", str(NIH), "--output_dir", str(out),
         "--encoding", "rle", "--workers", "2"]
    )  # fmt: skip
    assert (summary.images, summary.errors) == (10, 0)
    columns, rows = _read_csv(out / "metadata.csv")
    assert "nih_finding_labels" in columns
    for source, row in zip(subset, rows, strict=True):
        assert row["PatientID"] == source["patient_id"]
        assert row["ViewPosition"] == source["view_position"]
        age, sex = parse_age(source["age"]), parse_sex(source["sex"])
        assert row["Age"] == ("" if age is None else str(age))  # Some NIH ages are blank.
        assert row["Sex"] == (sex or "")
        assert row["Abnormal"] == ("true" if source["label"] == "abnormal" else "false")
        assert row["nih_finding_labels"] == source["nih_finding_labels"]
        ds = pydicom.dcmread(out / row["DicomPath"])
        png = np.asarray(Image.open(NIH / source["path"]).convert("L"))
        assert ds.pixel_array.shape == png.shape == (512, 512)
        np.testing.assert_array_equal(ds.pixel_array, png)
        assert ds.PatientID == source["patient_id"]
