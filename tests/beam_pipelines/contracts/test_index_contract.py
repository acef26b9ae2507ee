"""beam_pipelines.contracts.index: the filters' flags and matching, summary.json's numbers."""

from __future__ import annotations

import pytest

from beam_pipelines.contracts import index as ix
from beam_pipelines.contracts import metadata as md


def _cells(modality: str = "DX", study: str = "1.2.3") -> dict[str, str]:
    return {md.MODALITY: modality, md.STUDY_INSTANCE_UID: study}


def test_filters_parse_lists_case_and_date_ranges() -> None:
    filters = ix.Filters.parse("cr, DX,", "chest", "20200101-20231231", "1.2.3,1.2.4")
    assert filters.modalities == ("CR", "DX")
    assert filters.body_parts == ("CHEST",)
    assert (filters.date_from, filters.date_to) == ("20200101", "20231231")
    assert filters.study_uids == ("1.2.3", "1.2.4")
    assert ix.Filters.parse(study_date="20200101-").date_range == "20200101-"
    assert ix.Filters.parse(study_date="-20231231").date_range == "-20231231"
    assert ix.Filters.parse(study_date="20200101").date_range == "20200101-20200101"
    assert ix.Filters.parse() == ix.Filters()


@pytest.mark.parametrize("text", ["2020-2023", "-", "20200101-20231", "20231231-20200101", "x"])
def test_a_bad_date_range_names_the_flag(text: str) -> None:
    with pytest.raises(ValueError, match="--study_date"):
        ix.Filters.parse(study_date=text)


def test_excludes_names_the_first_failed_filter_and_missing_values_fail() -> None:
    filters = ix.Filters.parse("CR,DX", "CHEST", "20200101-20201231", "1.2.3")
    assert filters.excludes(_cells(), "chest", "20200615") is None
    assert filters.excludes(_cells(study="9.9"), "CHEST", "20200615") == "study_uid"
    assert filters.excludes(_cells("MR"), "CHEST", "20200615") == "modality"
    assert filters.excludes(_cells(), "HAND", "20200615") == "body_part"
    assert filters.excludes(_cells(), "", "20200615") == "body_part"
    assert filters.excludes(_cells(), "CHEST", "20210101") == "study_date"
    assert filters.excludes(_cells(), "CHEST", "") == "study_date"
    assert ix.Filters().excludes(_cells("MR"), "", "") is None
    open_end = ix.Filters.parse(study_date="20200101-")
    assert open_end.excludes(_cells(), "", "20991231") is None
    assert open_end.excludes(_cells(), "", "20191231") == "study_date"


def test_the_summary_records_how_many_study_uids_not_which() -> None:
    recorded = ix.Filters.parse(study_uid="1.2.3,1.2.4").as_dict()
    assert recorded["study_uid"] == 2
    assert "1.2.3" not in str(recorded)


def test_build_summary_adds_up_and_groups_by_reason() -> None:
    counts = {
        ix.INDEXED: 10,
        ix.LABELLED: 7,
        ix.UNLABELLED: 3,
        ix.rejected_key("not_dicom"): 2,
        ix.rejected_key("duplicate_instance"): 1,
        ix.filtered_key("modality"): 4,
        ix.unmatched_key("no_image"): 5,
        ix.unmatched_key("bad_value"): 1,
    }
    source = {"kind": "folder", "archive_root": "/a", "dicomweb_url": None}
    labels = {"file": "l.csv", "key": md.ACCESSION_NUMBER, "column": md.ABNORMAL}
    summary = ix.build_summary(counts, source, ix.Filters(), labels)
    assert summary["inputs"] == 10 + 3 + 4
    assert summary["rejected_by_reason"] == {"duplicate_instance": 1, "not_dicom": 2}
    assert summary["duplicates"] == 1
    assert (summary["filtered_out"], summary["filtered_by"]) == (4, {"modality": 4})
    assert summary["labels"]["labelled"] == 7 and summary["labels"]["unlabelled"] == 3
    assert summary["labels"]["unmatched"] == 6
    assert summary["labels"]["unmatched_by_reason"] == {"bad_value": 1, "no_image": 5}
    assert summary["files"] == [ix.METADATA_FILE, ix.REJECTS_FILE, ix.UNMATCHED_FILE]
    assert ix.build_summary({}, source, ix.Filters(), None)["labels"] is None


def test_build_summary_refuses_counts_it_does_not_know() -> None:
    with pytest.raises(RuntimeError, match="unexpected counts"):
        ix.build_summary({"kept": 1}, {}, ix.Filters(), None)
    with pytest.raises(RuntimeError):
        ix.build_summary({ix.INDEXED: -1}, {}, ix.Filters(), None)


def test_the_label_keys_are_index_columns() -> None:
    assert set(ix.LABEL_KEYS) <= set(md.COLUMNS) | set(md.INDEX_COLUMNS)


def test_format_row_and_clean_cell_write_what_the_reader_reads_back() -> None:
    header = md.format_row(["PatientID", "DicomPath", "Abnormal"])
    cells = [md.clean_cell(" a,b\x00 "), md.clean_cell('x"y\nz'), md.clean_cell(None)]
    text = header + md.format_row(cells)
    assert list(md.iter_metadata(text)) == [
        (1, {"PatientID": "a,b", "DicomPath": 'x"y\nz', "Abnormal": ""})
    ]
