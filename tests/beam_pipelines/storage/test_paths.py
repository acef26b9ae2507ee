"""beam_pipelines.storage.paths: a DicomPath may not leave the archive root, not even by symlink.

Missing files are the decoder's to report; a path that leaves the root
(``..``, an absolute path elsewhere, a symlink leading outside) is rejected
as ``path_escapes_root`` by row validation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from beam_pipelines.storage.paths import resolve_path
from beam_pipelines.transforms.rows import ValidRow, validate_row


def _cells(path: str) -> dict[str, str]:
    return {"PatientID": "P1", "StudyID": "S1", "DicomPath": path, "Abnormal": "true"}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("raw/a.dcm", "/archive/raw/a.dcm"),
        ("./raw/../raw/a.dcm", "/archive/raw/a.dcm"),
        ("../outside.dcm", None),
        ("raw/../../outside.dcm", None),
        ("/etc/passwd", None),
        ("/archive/raw/a.dcm", "/archive/raw/a.dcm"),
        ("gs://bucket/a.dcm", "gs://bucket/a.dcm"),
    ],
)
def test_resolve_path(path: str, expected: str | None) -> None:
    assert resolve_path("/archive", path) == expected


def test_resolve_path_under_uri_root() -> None:
    assert resolve_path("gs://bucket/archive", "raw/a.dcm") == "gs://bucket/archive/raw/a.dcm"
    assert resolve_path("gs://bucket/archive", "../other/a.dcm") is None


# --- Symlinks -------------------------------------------------------------------------


@pytest.fixture
def linked_archive(tmp_path: Path) -> Path:
    """archive/ with symlinks that stay inside and ones that lead outside."""
    root, outside = tmp_path / "archive", tmp_path / "outside"
    (root / "raw" / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "raw" / "a.dcm").write_bytes(b"inside")
    (outside / "secret.dcm").write_bytes(b"outside")
    (root / "inner_link.dcm").symlink_to(root / "raw" / "a.dcm")
    (root / "relative_inner_link.dcm").symlink_to("raw/a.dcm")
    (root / "inner_dir").symlink_to(root / "raw")
    (root / "escape_link.dcm").symlink_to(outside / "secret.dcm")
    (root / "raw" / "sub" / "relative_escape.dcm").symlink_to("../../../outside/secret.dcm")
    (root / "escape_dir").symlink_to(outside)
    (root / "raw" / "chain.dcm").symlink_to(root / "escape_link.dcm")
    (root / "dangling_escape.dcm").symlink_to(outside / "missing.dcm")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    return root


@pytest.mark.parametrize(
    ("path", "inside"),
    [
        ("raw/a.dcm", True),
        ("inner_link.dcm", True),
        ("relative_inner_link.dcm", True),
        ("inner_dir/a.dcm", True),
        ("raw/missing.dcm", True),  # missing files are the decoder's to report
        ("escape_link.dcm", False),
        ("raw/sub/relative_escape.dcm", False),
        ("escape_dir/secret.dcm", False),
        ("escape_dir/missing.dcm", False),
        ("raw/chain.dcm", False),
        ("dangling_escape.dcm", False),
    ],
)
def test_symlinks_may_not_leave_the_root(linked_archive: Path, path: str, inside: bool) -> None:
    resolved = resolve_path(str(linked_archive), path)
    assert (resolved is not None) == inside
    if inside:
        assert resolved == f"{linked_archive}/{path}"  # the lexical path, as written
    result = validate_row(1, _cells(path), str(linked_archive))
    assert isinstance(result, ValidRow) == inside
    if not inside:
        assert isinstance(result, dict) and result["reason"] == "path_escapes_root"
        assert "symlink" in result["detail"]


def test_symlink_loop_is_not_an_escape_error(linked_archive: Path) -> None:
    # A loop resolves nowhere outside; the decoder will report it unreadable.
    assert resolve_path(str(linked_archive), "loop_a") is not None


def test_root_reached_through_a_symlink(linked_archive: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(linked_archive)
    assert resolve_path(str(alias), "inner_link.dcm") == f"{alias}/inner_link.dcm"
    assert resolve_path(str(alias), "escape_link.dcm") is None
    assert resolve_path(str(alias), f"{linked_archive}/raw/a.dcm") is None  # lexically outside
