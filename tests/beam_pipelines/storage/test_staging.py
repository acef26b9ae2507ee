"""beam_pipelines.storage.staging: chunks appended per bundle, read back by reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from beam_pipelines.storage.staging import BundleStager, read_chunks


def _stage(folder: Path, chunks: list[bytes]) -> list[tuple[str, int, int]]:
    stager = BundleStager(str(folder))
    refs = [stager.append(chunk) for chunk in chunks]
    stager.close()
    return refs


def test_chunks_come_back_in_any_order_across_bundles(tmp_path: Path) -> None:
    first = [b"a" * 10, b"", b"bc" * 500]
    second = [bytes(range(256)) * 3, b"z"]
    refs = _stage(tmp_path, first) + _stage(tmp_path, second)
    # One file per bundle, not one per chunk.
    assert len(list(tmp_path.iterdir())) == 2
    chunks = first + second
    order = [4, 0, 3, 2, 1]
    # open_files=1: every switch between the two files closes and reopens one.
    assert list(read_chunks([refs[i] for i in order], open_files=1)) == [chunks[i] for i in order]
    assert list(read_chunks(refs)) == chunks


def test_a_stager_starts_a_new_file_for_each_bundle(tmp_path: Path) -> None:
    stager = BundleStager(str(tmp_path))
    one = stager.append(b"first bundle")
    stager.close()
    two = stager.append(b"second bundle")
    stager.close()
    stager.close()  # closing twice (finish_bundle, then teardown) is harmless
    assert one[0] != two[0] and (one[1], two[1]) == (0, 0)
    assert list(read_chunks([two, one])) == [b"second bundle", b"first bundle"]


def test_an_empty_bundle_writes_no_file(tmp_path: Path) -> None:
    BundleStager(str(tmp_path)).close()
    assert not list(tmp_path.iterdir())


def test_a_cut_short_staging_file_is_an_error(tmp_path: Path) -> None:
    (ref,) = _stage(tmp_path, [b"x" * 100])
    Path(ref[0]).write_bytes(b"x" * 60)
    with pytest.raises(OSError, match="cut short"):
        list(read_chunks([ref]))


def test_object_stores_get_one_object_per_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from beam_pipelines.storage import staging

    assert staging._is_object_store("gs://bucket/out/.staging")
    assert not staging._is_object_store("/data/out/.staging")
    # Their readers fetch a large window per seek: no shared bundle files there.
    monkeypatch.setattr(staging, "_is_object_store", lambda path: True)
    refs = _stage(tmp_path, [b"one", b"two", b"three"])
    assert len(list(tmp_path.iterdir())) == 3
    assert [(offset, length) for _, offset, length in refs] == [(0, 3), (0, 3), (0, 5)]
    assert list(read_chunks(refs[::-1])) == [b"three", b"two", b"one"]
