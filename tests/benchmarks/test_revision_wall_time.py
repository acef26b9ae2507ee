"""benchmarks/revision_wall_time.py on a tiny archive, HEAD against this tree: identical outputs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.benchmarks import BENCHMARKS, loaded_script
from tests.support.data import REPO


@pytest.mark.slow
def test_main_reports_both_jobs_on_both_sides_identical(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when run as a script: its folder first
    argv = ["--base", "HEAD", "--images", "6", "--rounds", "1", "--workdir", str(tmp_path)]
    try:
        with loaded_script("revision_wall_time") as bench:
            bench.main(argv)
    finally:  # the worktree's registration in the repository goes with it
        if (tmp_path / "base").exists():
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tmp_path / "base")], cwd=REPO
            )
    report = json.loads(capsys.readouterr().out)
    settings = report["settings"]
    assert settings["images"] == 6 and settings["rounds"] == 1 and settings["cores"] >= 1
    assert settings["base"]["rev"] == "HEAD" and settings["base"]["tree"] == str(tmp_path / "base")
    assert settings["head"]["tree"] == str(REPO)
    for side in ("base", "head"):
        assert len(settings[side]["commit"]) == 40
        assert settings[side]["kernel_loaded"] is (settings[side]["kernel"] is not None)
    assert set(report["jobs"]) == {"preprocess", "score"}
    for name, job in report["jobs"].items():
        (measured,) = job["rounds"]
        assert measured["order"] == ["base", "head"]
        assert measured["base"] > 0 and measured["head"] > 0
        assert job["median_wall_seconds"] == {"base": measured["base"], "head": measured["head"]}
        assert job["ratio"] > 0
        assert job["identical"] is True and job["differing"] == [], name
    assert (tmp_path / "out" / "head" / "pre" / "manifest.json").exists()
