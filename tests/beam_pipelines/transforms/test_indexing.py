"""The index's stages: header reading, sources, filters, duplicates, labels, ordered files."""

from __future__ import annotations

import csv
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from archive_tools.dicom_writer import PixelFormat, RadiographHeader, build_dataset, write_dicom
from beam_pipelines.contracts import index as ix
from beam_pipelines.contracts import metadata as md
from beam_pipelines.storage.dicomweb import DicomwebSettings
from beam_pipelines.transforms import indexing
from beam_pipelines.transforms.index_headers import IndexRejected, read_file_header
from beam_pipelines.transforms.labels import JoinLabels, join_key
from beam_pipelines.transforms.ordered import (
    WriteOrdered,
    concatenate_parts,
    parts_of,
)

FORMAT = PixelFormat(bits_stored=12)


def _header(patient: str = "P1", study: str = "S1", **fields: Any) -> RadiographHeader:
    values = {"patient_age": 42, "patient_sex": "F", "uid_seed": "t", **fields}
    return RadiographHeader(patient_id=patient, study_id=study, **values)


def _write(path: Path, header: RadiographHeader, encoding: str = "explicit_le") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8)
    write_dicom(path, stored, FORMAT, encoding, header)
    return path


def _dicom_bytes(header: RadiographHeader, encoding: str = "explicit_le") -> bytes:
    out = io.BytesIO()
    write_dicom(out, np.arange(64, dtype=np.uint16).reshape(8, 8), FORMAT, encoding, header)
    return out.getvalue()


def _index(path: Path, relative: str = "x.dcm") -> dict[str, str]:
    return indexing.index_file(str(path), relative)[0]


# ------------------------------------------------------------- header reading


@pytest.mark.parametrize("encoding", ["explicit_le", "implicit_le", "big_endian", "deflate", "rle"])
def test_a_header_gives_the_contract_cells(tmp_path: Path, encoding: str) -> None:
    header = _header(view_position="LATERAL", modality="CR")
    path = _write(tmp_path / "a.dcm", header, encoding)
    cells, body_part, study_date = indexing.index_file(str(path), "a.dcm")
    study, series, sop = (str(u) for u in header.uids())
    assert cells == {
        md.PATIENT_ID: "P1",
        md.STUDY_ID: "S1",
        md.DICOM_PATH: "a.dcm",
        md.VIEW_POSITION: "LATERAL",
        md.ABNORMAL: "",
        md.AGE: "42",
        md.SEX: "F",
        md.STUDY_INSTANCE_UID: study,
        md.SERIES_INSTANCE_UID: series,
        md.SOP_INSTANCE_UID: sop,
        md.ACCESSION_NUMBER: header.accession(),
        md.MODALITY: "CR",
    }
    assert (body_part, study_date) == ("CHEST", "20240101")


def test_the_header_read_stops_before_the_pixels(tmp_path: Path) -> None:
    data = _dicom_bytes(_header())
    read: list[int] = []

    class Counting(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            chunk = super().read(size)
            read.append(len(chunk))
            return chunk

    read_file_header(Counting(data))  # type: ignore[arg-type]
    assert sum(read) < len(data) - 64 * 2  # the 8x8 16-bit pixels are never read


def test_the_writer_gives_every_image_of_a_study_one_accession_number() -> None:
    first, second = _header(instance_number=1), _header(instance_number=2)
    other = _header(study="S2")
    assert first.accession() == second.accession() != other.accession()
    assert first.accession() and len(first.accession()) <= 16
    assert _header(accession_number="ACC9").accession() == "ACC9"


def test_not_dicom_truncated_too_large_and_missing_uids_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a DICOM file at all, just some words\n" * 5)
    data = _dicom_bytes(_header())
    (tmp_path / "cut.dcm").write_bytes(data[:400])
    deflated = _dicom_bytes(_header(), "deflate")
    (tmp_path / "cut_deflate.dcm").write_bytes(deflated[:300])
    (tmp_path / "empty.dcm").write_bytes(b"")
    no_sop = _dicom_bytes(_header(extra={"SOPInstanceUID": ""}))
    (tmp_path / "nosop.dcm").write_bytes(no_sop)
    reasons = {}
    for name in ("notes.txt", "cut.dcm", "cut_deflate.dcm", "empty.dcm", "nosop.dcm"):
        with pytest.raises(IndexRejected) as caught:
            _index(tmp_path / name)
        reasons[name] = caught.value.reason
    assert reasons == {
        "notes.txt": "not_dicom",
        "cut.dcm": "truncated",
        "cut_deflate.dcm": "truncated",
        "empty.dcm": "not_dicom",
        "nosop.dcm": "missing_uid",
    }
    with pytest.raises(IndexRejected) as caught:
        read_file_header(io.BytesIO(data), limit=200)  # type: ignore[arg-type]
    assert caught.value.reason == "too_large"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on cut values
@pytest.mark.parametrize("encoding", ["explicit_le", "deflate"])
def test_a_file_cut_anywhere_is_rejected_or_gives_the_whole_header(encoding: str) -> None:
    data = _dicom_bytes(_header(), encoding)
    whole = indexing.header_cells(indexing.dataset_value(read_file_header(io.BytesIO(data))), "x")
    reasons = set()
    for cut in range(len(data)):
        try:
            ds = read_file_header(io.BytesIO(data[:cut]))  # type: ignore[arg-type]
        except IndexRejected as exc:
            reasons.add(exc.reason)
            continue
        assert indexing.header_cells(indexing.dataset_value(ds), "x") == whole, cut
    assert reasons == {"not_dicom", "truncated"}


def test_a_raw_data_set_without_preamble_is_read(tmp_path: Path) -> None:
    ds = build_dataset(np.zeros((4, 4), np.uint16), FORMAT, "explicit_le", _header())
    del ds.file_meta
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=True, little_endian=True)
    (tmp_path / "raw.dcm").write_bytes(out.getvalue())
    assert _index(tmp_path / "raw.dcm")[md.PATIENT_ID] == "P1"


def test_a_fifo_is_rejected_without_being_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(IndexRejected, match="unreadable"):
        _index(tmp_path / "pipe")


def test_glob_root_and_relative_paths() -> None:
    assert indexing.glob_root("gs://b/archive/**.dcm") == "gs://b/archive"
    assert indexing.glob_root("/data/x/P*/s?.dcm") == "/data/x"
    assert indexing.glob_root("/data/[ab]/*.dcm") == "/data"
    assert indexing.relative_path("gs://b/archive/P1/a.dcm", "gs://b/archive") == "P1/a.dcm"
    assert indexing.relative_path("/d/a/b.dcm", "/d/") == "a/b.dcm"


# --------------------------------------------------------- pipeline: a folder


def _archive(tmp_path: Path) -> tuple[Path, dict[str, RadiographHeader]]:
    root = tmp_path / "archive"
    headers = {
        "p1/a.dcm": _header("P1", "S1", modality="DX", study_date="20210301"),
        "p1/b.dcm": _header("P1", "S1", modality="DX", instance_number=2, study_date="20210301"),
        "p2/a.dcm": _header("P2", "S1", modality="CR", body_part="HAND", study_date="20190101"),
        "p3/a.dcm": _header("P3", "S9", modality="OT", study_date="20220101"),
    }
    for name, header in headers.items():
        _write(root / name, header)
    (root / "copy").mkdir()
    (root / "copy" / "a.dcm").write_bytes((root / "p1" / "a.dcm").read_bytes())
    (root / "README.txt").write_text("an archive\n")
    (root / "p3" / "cut.dcm").write_bytes((root / "p3" / "a.dcm").read_bytes()[:350])
    return root, headers


def _collect(pcoll: beam.PCollection, path: Path, label: str) -> None:
    """Writes a collection's elements to ``path`` as JSON (workers may be other processes)."""
    _ = (
        pcoll
        | f"All{label}" >> beam.combiners.ToList()
        | f"Save{label}" >> beam.Map(lambda items: path.write_text(json.dumps(items)))
    )


def _run_index(root: Path, filters: ix.Filters) -> dict[str, list[Any]]:
    out = root.parent / "results"
    out.mkdir(exist_ok=True)
    with TestPipeline() as pipeline:
        outcomes = pipeline | indexing.ReadArchive(filters, folder=str(root), root=str(root))
        rows, rejects, filtered = outcomes | indexing.IndexedRows()
        for name, pcoll in (("rows", rows), ("rejects", rejects), ("filtered", filtered)):
            _collect(pcoll, out / name, name)
    return {name: json.loads((out / name).read_text()) for name in ("rows", "rejects", "filtered")}


def test_a_folder_is_indexed_with_rejects_and_duplicates(tmp_path: Path) -> None:
    root, _ = _archive(tmp_path)
    results = _run_index(root, ix.Filters())
    paths = sorted(r[md.DICOM_PATH] for r in results["rows"])
    assert paths == ["copy/a.dcm", "p1/b.dcm", "p2/a.dcm", "p3/a.dcm"]
    rejects = {r["dicom_path"]: r for r in results["rejects"]}
    assert {path: r["reason"] for path, r in rejects.items()} == {
        "README.txt": "not_dicom",
        "p3/cut.dcm": "truncated",
        "p1/a.dcm": "duplicate_instance",
    }
    assert all(r["stage"] == "index" and r["row"] is None for r in rejects.values())
    assert results["filtered"] == []


def test_the_first_path_of_a_copied_instance_is_kept(tmp_path: Path) -> None:
    root, _ = _archive(tmp_path)
    results = _run_index(root, ix.Filters())
    kept = {r[md.DICOM_PATH] for r in results["rows"]}
    duplicate = next(r for r in results["rejects"] if r["reason"] == "duplicate_instance")
    # "copy/a.dcm" sorts before "p1/a.dcm": the copy is the first path, the original the later one.
    assert "copy/a.dcm" in kept and duplicate["dicom_path"] == "p1/a.dcm"
    assert "copy/a.dcm" in duplicate["detail"]


@pytest.mark.parametrize(
    ("filters", "kept", "failed"),
    [
        (ix.Filters.parse(modality="DX,CR"), {"copy/a.dcm", "p1/b.dcm", "p2/a.dcm"}, ["modality"]),
        (
            ix.Filters.parse(body_part="CHEST"),
            {"copy/a.dcm", "p1/b.dcm", "p3/a.dcm"},
            ["body_part"],
        ),
        (
            ix.Filters.parse(study_date="20200101-20211231"),
            {"copy/a.dcm", "p1/b.dcm"},
            ["study_date", "study_date"],
        ),
    ],
)
def test_filters_keep_matching_instances_and_count_the_rest(
    tmp_path: Path, filters: ix.Filters, kept: set[str], failed: list[str]
) -> None:
    root, _ = _archive(tmp_path)
    results = _run_index(root, filters)
    assert {r[md.DICOM_PATH] for r in results["rows"]} == kept
    assert sorted(results["filtered"]) == failed


def test_a_study_uid_filter(tmp_path: Path) -> None:
    root, headers = _archive(tmp_path)
    study = str(headers["p3/a.dcm"].uids()[0])
    results = _run_index(root, ix.Filters.parse(study_uid=study))
    assert [r[md.DICOM_PATH] for r in results["rows"]] == ["p3/a.dcm"]
    assert len(results["filtered"]) == 4


# ------------------------------------------------------------------ ordering


def _ordered(tmp_path: Path, lines: list[tuple[Any, str]], per_range: int) -> tuple[str, int]:
    target = tmp_path / "out.csv"
    with TestPipeline() as pipeline:
        _ = pipeline | beam.Create(lines, reshuffle=False) | WriteOrdered(str(target), per_range)
    parts = parts_of(str(target))
    concatenate_parts(str(target), "head\n", parts)
    return target.read_text(), len(parts)


def test_ordered_files_do_not_depend_on_the_input_order_or_the_ranges(tmp_path: Path) -> None:
    keys = [(f"1.2.{random.Random(i).randrange(10**6)}", "s", str(i)) for i in range(300)]
    lines = [(k, ",".join(k) + "\n") for k in keys]
    expected = "head\n" + "".join(line for _, line in sorted(lines))
    shuffled = list(lines)
    random.Random(3).shuffle(shuffled)
    assert _ordered(tmp_path / "a", lines, 1000) == (expected, 1)
    text, parts = _ordered(tmp_path / "b", shuffled, 50)
    assert text == expected and 2 < parts <= 6
    text, parts = _ordered(tmp_path / "c", list(reversed(lines)), 1)
    assert text == expected and parts > 20
    assert _ordered(tmp_path / "d", [], 4) == ("head\n", 0)


def test_metadata_lines_sort_by_the_instance_uids() -> None:
    cells = {c: "" for c in (*md.COLUMNS, *md.INDEX_COLUMNS)}
    first = {
        **cells,
        md.STUDY_INSTANCE_UID: "1.2",
        md.SERIES_INSTANCE_UID: "9",
        md.SOP_INSTANCE_UID: "1",
    }
    second = {**first, md.SERIES_INSTANCE_UID: "10"}
    assert indexing.metadata_line(second)[0] < indexing.metadata_line(first)[0]  # text order
    line = indexing.metadata_line({**first, md.PATIENT_ID: "a,b"})[1]
    assert next(csv.reader([line]))[0] == "a,b"


# -------------------------------------------------------------------- labels


def _row(
    sop: str, patient: str = "P1", study: str = "1.1", accession: str = "A1"
) -> dict[str, str]:
    cells = {c: "" for c in (*md.COLUMNS, *md.INDEX_COLUMNS)}
    cells.update(
        {
            md.PATIENT_ID: patient,
            md.DICOM_PATH: f"{sop}.dcm",
            md.STUDY_INSTANCE_UID: study,
            md.SOP_INSTANCE_UID: sop,
            md.ACCESSION_NUMBER: accession,
        }
    )
    return cells


def _join(tmp_path: Path, rows: list[dict[str, str]], labels: str, key: str) -> tuple[dict, list]:
    path = tmp_path / "labels.csv"
    path.write_text(labels)
    with TestPipeline() as pipeline:
        joined, unmatched = pipeline | beam.Create(rows) | JoinLabels(str(path), key, md.ABNORMAL)
        _collect(joined, tmp_path / "joined", "joined")
        _collect(unmatched, tmp_path / "unmatched", "unmatched")
    joined_rows = json.loads((tmp_path / "joined").read_text())
    labels_by_sop = {c[md.SOP_INSTANCE_UID]: c[md.ABNORMAL] for c in joined_rows}
    assert len(labels_by_sop) == len(rows)  # every image once, labelled or not
    return labels_by_sop, sorted(tuple(u) for u in json.loads((tmp_path / "unmatched").read_text()))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (md.STUDY_INSTANCE_UID, "1.1"),
        (md.ACCESSION_NUMBER, "A1"),
        (md.SOP_INSTANCE_UID, "i1"),
        (md.PATIENT_ID, "P1"),
    ],
)
def test_each_key_kind_labels_its_images(tmp_path: Path, key: str, value: str) -> None:
    rows = [_row("i1"), _row("i2", "P2", "2.2", "A2")]
    labels, unmatched = _join(tmp_path, rows, f"{key},Abnormal\n{value},YES\n", key)
    assert labels == {"i1": "true", "i2": ""}
    assert unmatched == []


def test_unmatched_bad_conflicting_and_blank_labels_are_listed(tmp_path: Path) -> None:
    rows = [_row("i1", study="1.1"), _row("i2", study="2.2"), _row("i3", study="3.3")]
    rows.append(_row("i4", study="4.4"))
    text = (
        "StudyInstanceUID,Abnormal,Note\n"
        "1.1,0,x\n"  # row 1: labels i1
        "1.1,false,\n"  # row 2: the same value again: fine
        "2.2,true,\n"  # row 3: conflicts with row 4
        "2.2,no,\n"  # row 4
        "3.3,perhaps,\n"  # row 5: bad value; i3 stays unlabelled
        "9.9,true,\n"  # row 6: no image
        ",true,\n"  # row 7: blank key
        "4.4\n"  # row 8: a short row (ragged)
    )
    labels, unmatched = _join(tmp_path, rows, text, md.STUDY_INSTANCE_UID)
    assert labels == {"i1": "false", "i2": "", "i3": "", "i4": ""}
    assert unmatched == [
        (3, "2.2", "conflicting_value"),
        (4, "2.2", "conflicting_value"),
        (5, "3.3", "bad_value"),
        (6, "9.9", "no_image"),
        (7, "", "blank_key"),
        (8, "", "unreadable_row"),
    ]


def test_an_image_with_a_blank_key_stays_unlabelled(tmp_path: Path) -> None:
    rows = [_row("i1", accession=""), _row("i2", accession="A2")]
    labels, unmatched = _join(
        tmp_path, rows, "AccessionNumber,Abnormal\nA2,1\n", md.ACCESSION_NUMBER
    )
    assert labels == {"i1": "", "i2": "true"}
    assert unmatched == []


def test_join_key_lists_every_row_of_a_conflict_once() -> None:
    group = {"images": [], "labels": [(2, "yes"), (1, "no"), (3, "??")]}
    assert list(join_key(("k", group))) == [
        ("unmatched", (1, "k", "conflicting_value")),
        ("unmatched", (2, "k", "conflicting_value")),
        ("unmatched", (3, "k", "bad_value")),
    ]


# ------------------------------------------------------------------ DICOMweb


def test_qido_values_and_server_side_study_filters() -> None:
    found = {
        "00100020": {"vr": "LO", "Value": ["P7"]},
        "00200013": {"vr": "IS", "Value": [3]},
        "00101010": {"vr": "AS"},
    }
    value = indexing.qido_value(found)
    assert (value("PatientID"), value("PatientAge"), value("ViewPosition")) == ("P7", "", "")
    params = indexing.qido_study_params(ix.Filters.parse("DX,CR", "CHEST", "20200101-", "1.2,1.3"))
    assert params == [
        {
            "includefield": "0020000D",
            "ModalitiesInStudy": "CR,DX",
            "StudyDate": "20200101-",
            "StudyInstanceUID": "1.2,1.3",
        }
    ]
    assert indexing.qido_study_params(ix.Filters()) == [{"includefield": "0020000D"}]


def test_many_study_uids_are_searched_in_chunks_every_uid_once() -> None:
    uids = [f"1.2.{n}" for n in range(indexing.STUDY_UIDS_PER_SEARCH * 2 + 3)]
    searches = indexing.qido_study_params(ix.Filters.parse(study_uid=",".join(uids)))
    assert len(searches) == 3
    named = [uid for params in searches for uid in str(params["StudyInstanceUID"]).split(",")]
    assert sorted(named) == sorted(uids)


def test_instance_cells_name_the_instance_by_its_dicomweb_path() -> None:
    settings = DicomwebSettings("http://pacs:8042/dicom-web")
    found = {"00080018": {"vr": "UI", "Value": ["9.9"]}, "0020000E": {"vr": "UI", "Value": ["8.8"]}}
    cells, _, _ = indexing._instance_cells(settings, "7.7", indexing.qido_value(found))
    assert cells[md.DICOM_PATH] == settings.instance_path("7.7", "8.8", "9.9")
    assert cells[md.STUDY_INSTANCE_UID] == "7.7"
    assert cells[md.STUDY_ID] == "7.7"  # a blank StudyID is named by the study's UID
    with pytest.raises(IndexRejected, match="missing_uid"):
        indexing._instance_cells(settings, "7.7", indexing.qido_value({}))


def test_reject_lines_follow_the_rejects_contract_order() -> None:
    records = [
        {"row": None, "dicom_path": "b", "stage": "index", "reason": "x", "detail": ""},
        {"row": None, "dicom_path": "a", "stage": "index", "reason": "x", "detail": ""},
    ]
    ordered = sorted(indexing.reject_line(r) for r in records)
    assert [json.loads(line)["dicom_path"] for _, line in ordered] == ["a", "b"]


def test_a_study_that_cannot_be_listed_is_one_reject_and_filters_apply_to_instances(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from beam_pipelines.storage.dicomweb import FetchFailed

    def instance(sop: str, modality: str) -> dict[str, Any]:
        return {
            "00080018": {"vr": "UI", "Value": [sop]},
            "0020000E": {"vr": "UI", "Value": ["5.5"]},
            "00080060": {"vr": "CS", "Value": [modality]},
        }

    def search(settings: Any, resource: str, params: Any, page_size: int = 1000) -> Any:
        assert resource.endswith("/instances") and params["includefield"]
        if resource.startswith("studies/bad/"):
            raise FetchFailed("HTTP 503: the server is busy", status=503)
        return iter([instance("1.1", "DX"), instance("1.2", "MR")])

    monkeypatch.setattr(indexing, "search", search)
    settings = DicomwebSettings("http://pacs/dicom-web", max_connections=2)
    fn = indexing.ListInstancesFn(settings, ix.Filters.parse(modality="DX"))
    fn.setup()
    outcomes = list(fn.process(["good", "bad", ""]))
    kept = [v for tag, v in outcomes if tag == "kept"]
    assert [c[md.DICOM_PATH] for c in kept] == [settings.instance_path("good", "5.5", "1.1")]
    assert [v for tag, v in outcomes if tag == indexing.FILTERED] == ["modality"]
    failed, blank = [v for tag, v in outcomes if tag == "rejected"]
    assert failed["reason"] == "fetch_failed" and "503" in failed["detail"]
    assert blank["reason"] == "missing_uid"  # a study listed without its UID: no gap
    assert failed["dicom_path"] == "dicomweb+http://pacs/dicom-web/studies/bad"


def test_entries_metadata_csv_cannot_name_or_read_are_rejects_not_gaps(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    _write(root / "a.dcm", _header())
    data = (root / "a.dcm").read_bytes()
    os.symlink(root, root / "loop")  # a link to a folder: never followed
    (root / "trailing.dcm ").write_bytes(data)
    os.mkfifo(root / "pipe")
    latin1 = os.fsencode(str(root)) + b"/caf\xe9.dcm"  # not UTF-8
    with open(latin1, "wb") as handle:
        handle.write(data)
    results = _run_index(root, ix.Filters())
    assert [r[md.DICOM_PATH] for r in results["rows"]] == ["a.dcm"]
    rejects = sorted((r["dicom_path"], r["reason"], r["detail"]) for r in results["rejects"])
    assert [(path, reason) for path, reason, _ in rejects] == [
        ("caf\\xe9.dcm", "unreadable"),
        ("loop", "unreadable"),
        ("pipe", "unreadable"),
        ("trailing.dcm", "unreadable"),
    ]
    assert "UTF-8" in rejects[0][2] and "folder" in rejects[1][2] and "blank" in rejects[3][2]


def test_the_listing_announces_the_progress_total(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from beam_pipelines import console

    progress = tmp_path / "progress"
    progress.mkdir()
    monkeypatch.setenv(console.PROGRESS_ENV, str(progress))
    root, _ = _archive(tmp_path)
    listed = list(indexing.ListFilesFn(folder=True).process(str(root)))
    assert len(listed) == 7 and all(isinstance(p, bytes) for p in listed)
    assert console._read(str(progress)) == (0, 7)

    studies = [{"0020000D": {"vr": "UI", "Value": [f"1.{i}"]}} for i in range(3)]
    monkeypatch.setattr(indexing, "search", lambda *args, **kwargs: iter(studies))
    settings = DicomwebSettings("http://pacs/dicom-web")
    found = list(indexing.ListStudiesFn(settings, ix.Filters()).process(None))
    assert found == ["1.0", "1.1", "1.2"]
    assert console._read(str(progress)) == (0, 3)
