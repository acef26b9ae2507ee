from __future__ import annotations

import csv
import filecmp
from pathlib import Path

import numpy as np
import pydicom
import pytest

from archive_tools import synth
from archive_tools.dicom_writer import ENCODINGS
from archive_tools.phantom import chest_phantom
from beam_pipelines.contracts.metadata import COLUMNS, format_dicom_age, parse_age, parse_label

ARGS = ["--patients", "6", "--seed", "3", "--min_size", "32", "--max_size", "64", "--broken", "8"]
ALL_ENCODINGS = ",".join(f"{name}:1" for name in ENCODINGS)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, synth.SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "archive"
    summary = synth.run(["--output_dir", str(out), *ARGS, "--encodings", ALL_ENCODINGS])
    return out, summary


def test_metadata_contract(archive):
    out, summary = archive
    columns, rows = _read_csv(out / "metadata.csv")
    assert tuple(columns) == COLUMNS
    assert len(rows) == summary.images + summary.broken_rows
    assert summary.patients == 6 and summary.broken_rows == 8
    assert sum(summary.encodings.values()) == summary.images
    valid = rows[: summary.images]
    assert len({r["PatientID"] for r in valid}) == 6
    assert len({r["DicomPath"] for r in valid}) == len(valid)
    for row in valid:
        assert row["DicomPath"] == f"raw/{row['PatientID']}/{row['DicomPath'].rsplit('/', 1)[1]}"
        assert row["DicomPath"].startswith(f"raw/{row['PatientID']}/{row['StudyID']}_")
        assert row["Abnormal"] in ("true", "false")
        assert 18 <= int(row["Age"]) <= 90
        assert row["Sex"] in ("M", "F", "")
        assert row["ViewPosition"] in ("PA", "AP", "LATERAL")


def test_files_decode_and_match_metadata(archive):
    out, summary = archive
    _, rows = _read_csv(out / "metadata.csv")
    _, images = _read_csv(out / "synth_images.csv")
    by_path = {image["DicomPath"]: image for image in images}
    assert len(by_path) == summary.images
    for row in rows[: summary.images]:
        ds = pydicom.dcmread(out / row["DicomPath"])
        image = by_path[row["DicomPath"]]
        assert ds.PatientID == row["PatientID"]
        assert ds.StudyID == row["StudyID"]
        assert ds.ViewPosition == row["ViewPosition"]
        assert ds.PatientAge == format_dicom_age(int(row["Age"]))
        assert ds.PatientSex == row["Sex"]
        assert ds.PatientName == f"SYNTH^{row['PatientID']}"
        assert ds.file_meta.TransferSyntaxUID == ENCODINGS[image["Encoding"]]
        assert ds.BitsStored == int(image["BitsStored"])
        assert ds.PhotometricInterpretation == image["PhotometricInterpretation"]
        pixels = ds.pixel_array
        assert pixels.shape == (int(image["Rows"]), int(image["Columns"]))
        assert min(pixels.shape) >= 32 and max(pixels.shape) <= 64
        if image["Encoding"] == "jpeg_baseline":
            assert ds.BitsStored == 8
        if image["WindowWidth"]:
            assert float(ds.WindowWidth) == float(image["WindowWidth"])


def test_expected_rejects(archive):
    out, summary = archive
    columns, rejects = _read_csv(out / "expected_rejects.csv")
    assert columns == ["row", "DicomPath", "reason"]
    assert [r["reason"] for r in rejects] == list(synth.BROKEN_KINDS)
    _, rows = _read_csv(out / "metadata.csv")
    by_reason = {}
    for reject in rejects:
        row = rows[int(reject["row"]) - 1]  # 1-based data row, header not counted.
        assert row["DicomPath"] == reject["DicomPath"]
        by_reason[reject["reason"]] = row
    path = {reason: out / row["DicomPath"] for reason, row in by_reason.items()}
    assert not path["missing_file"].exists()
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(path["not_dicom"])
    with pytest.raises(Exception):  # noqa: B017 - pydicom raises several kinds here.
        pydicom.dcmread(path["truncated"]).pixel_array  # noqa: B018
    assert "PixelData" not in pydicom.dcmread(path["no_pixel_data"])
    duplicated = by_reason["duplicate_path"]["DicomPath"]
    assert [r["DicomPath"] for r in rows[: summary.images]].count(duplicated) == 1
    escaping = path["path_escapes_root"]
    assert by_reason["path_escapes_root"]["DicomPath"].startswith("../")
    assert escaping.resolve().parent == out.parent.resolve()
    assert pydicom.dcmread(escaping).pixel_array.shape == (64, 64)
    assert parse_label(by_reason["bad_label"]["Abnormal"]) is None
    assert by_reason["bad_label"]["Abnormal"] == "maybe"
    assert pydicom.dcmread(path["bad_label"]).pixel_array.shape == (64, 64)
    assert by_reason["missing_patient_id"]["PatientID"] == ""
    assert pydicom.dcmread(path["missing_patient_id"]).pixel_array.shape == (64, 64)
    # Apart from the rejects every field of every row parses.
    for row in rows[: summary.images]:
        assert parse_label(row["Abnormal"]) is not None and parse_age(row["Age"]) is not None


def test_deterministic_and_independent_of_workers(archive, tmp_path):
    out, _ = archive
    again = tmp_path / "again"
    synth.run(["--output_dir", str(again), *ARGS, "--encodings", ALL_ENCODINGS, "--workers", "2"])
    for name in ("metadata.csv", "synth_images.csv", "expected_rejects.csv"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    files = sorted(p.relative_to(out) for p in (out / "raw").rglob("*.dcm"))
    assert files == sorted(p.relative_to(again) for p in (again / "raw").rglob("*.dcm"))
    _, mismatch, errors = filecmp.cmpfiles(out, again, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors


def test_seed_changes_output(archive, tmp_path):
    out, _ = archive
    other = tmp_path / "other"
    synth.run(["--output_dir", str(other), *ARGS[:2], "--seed", "4", *ARGS[4:], "--workers", "1"])
    assert (out / "metadata.csv").read_bytes() != (other / "metadata.csv").read_bytes()


def test_jpeg_baseline_forces_8_bit(tmp_path):
    out = tmp_path / "jpeg"
    summary = synth.run(
        ["--output_dir", str(out), "--patients", "2", "--min_size", "32", "--max_size", "48",
         "--encodings", "jpeg_baseline", "--workers", "1"]
    )  # fmt: skip
    assert summary.encodings == {"jpeg_baseline": summary.images}
    for path in (out / "raw").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert (ds.BitsStored, ds.PixelRepresentation, ds.LossyImageCompression) == (8, 0, "01")


def test_overwrite(tmp_path):
    out = tmp_path / "archive"
    base = ["--output_dir", str(out), "--patients", "1", "--min_size", "32", "--max_size", "32"]
    synth.run(base)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as excinfo:
        synth.run(base)
    assert excinfo.value.code == 2
    synth.run([*base, "--overwrite", "--seed", "9"])
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "bad",
    [
        ["--patients", "0"],
        ["--patients", "x"],
        ["--patients", "2", "--encodings", "explicit_le:1,mpeg4:2"],
        ["--patients", "2", "--encodings", "j2k:-1"],
        ["--patients", "2", "--encodings", "j2k:0"],
        ["--patients", "2", "--min_size", "300", "--max_size", "200"],
        ["--patients", "2", "--max_size", "5000"],
        ["--patients", "2", "--min_size", "16"],
        ["--patients", "2", "--broken", "-1"],
        ["--patients", "2", "--workers", "0"],
        ["--patients", "2", "--no_such_flag"],
    ],
)
def test_bad_arguments_exit_2(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        synth.run(["--output_dir", str(tmp_path / "out"), *bad])
    assert excinfo.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as excinfo:
        synth.run(["--help"])
    assert excinfo.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--output_dir", "--patients", "--seed", "--min_size", "--max_size",
                 "--encodings", "--broken", "--workers", "--overwrite"):  # fmt: skip
        assert flag in text


def test_parse_encodings():
    assert synth.parse_encodings("explicit_le:4, j2k:2,rle") == {
        "explicit_le": 4.0,
        "j2k": 2.0,
        "rle": 1.0,
    }


def _lung_mask(rows: int, cols: int) -> np.ndarray:
    y = (np.arange(rows) + 0.5)[:, None] / rows
    x = ((np.arange(cols) + 0.5) / cols * 2 - 1)[None, :]
    return (((np.abs(x) - 0.40) / 0.22) ** 2 + ((y - 0.45) / 0.22) ** 2) < 1.0


def test_phantom_abnormal_brighter_in_lungs():
    size = 128
    mask = _lung_mask(size, size)
    normal = [
        chest_phantom(np.random.default_rng(i), size, size, abnormal=False) for i in range(12)
    ]
    abnormal = [
        chest_phantom(np.random.default_rng(i), size, size, abnormal=True) for i in range(12)
    ]
    for image in normal + abnormal:
        assert image.dtype == np.float32 and image.shape == (size, size)
        assert image.min() >= 0.0 and image.max() <= 1.0
    # Same seed: identical except for the finding, which only brightens, mostly in the lungs.
    for a, n in zip(abnormal, normal, strict=True):
        gain = a - n
        assert gain.min() > -1e-6
        assert gain[mask].max() > 0.1
        assert gain[mask].mean() > 2 * gain[~mask].mean()
    # ...and the lungs stay darker than the mediastinum in normal images.
    centre = np.zeros((size, size), bool)
    centre[40:90, 60:68] = True
    assert all(n[mask].mean() < n[centre].mean() for n in normal)


def test_phantom_large_and_lateral():
    rng = np.random.default_rng(0)
    image = chest_phantom(rng, 2500, 2000, abnormal=True, view="LATERAL")
    assert image.shape == (2500, 2000) and image.dtype == np.float32
