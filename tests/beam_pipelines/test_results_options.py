"""beam_pipelines.results_options: what makes a scoring run another run, and a usable folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from beam_pipelines import score
from beam_pipelines.contracts.structured_report import ReportRun
from beam_pipelines.results_options import folder_problem, scoring_options

BASE = ["--model", "m", "--metadata", "x.csv", "--output", "o"]


def _options(*flags: str) -> dict:
    args, _ = score.build_parser().parse_known_args([*BASE, *flags])
    return scoring_options(args)


@pytest.mark.parametrize(
    "flags",
    [
        ["--resize_policy", "stretch"],
        ["--range_source", "bit_range"],
        ["--voi_index", "-1"],
        ["--full_resolution_decode"],
        ["--multiframe", "reject"],
        ["--color", "luminance"],
    ],
)
def test_every_option_that_changes_a_model_input_makes_another_run(flags: list[str]) -> None:
    # A rerun with other decoding must not find the first run's reports "already present".
    default, changed = _options(), _options(*flags)
    assert changed != default
    runs = [ReportRun("m", "ab" * 32, 0.5, options) for options in (default, changed)]
    assert runs[0].series_uid("1.2.3") != runs[1].series_uid("1.2.3")
    assert runs[0].sop_uid("1.2.3", "1.2.3.4", "1.2.3.4.5") != runs[1].sop_uid(
        "1.2.3", "1.2.3.4", "1.2.3.4.5"
    )


def test_options_that_only_reject_inputs_do_not() -> None:
    assert _options("--read_timeout_s", "5", "--dicomweb_retries", "0") == _options()


def test_a_folder_is_checked_without_being_made(tmp_path: Path) -> None:
    assert folder_problem(str(tmp_path / "new" / "reports")) is None
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    assert folder_problem(str(tmp_path / "file" / "reports")) == (
        "a file stands where a folder is needed"
    )
    assert "cannot write there" in str(folder_problem("zz://bucket/reports"))
