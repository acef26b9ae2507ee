"""The house rules of tests/test_architecture.py, applied to the explain/ package too.

tests/test_architecture.py walks its own list of packages; until explain/ is
on it, these run its checks over that list plus explain/.
"""

from __future__ import annotations

import pytest

from tests import test_architecture as rules


@pytest.fixture(autouse=True)
def _with_explain(monkeypatch: pytest.MonkeyPatch) -> None:
    if "explain" not in rules.PACKAGES:
        monkeypatch.setattr(rules, "PACKAGES", (*rules.PACKAGES, "explain"))


def test_explain_is_walked() -> None:
    assert any(path.parts[-2] == "explain" for path in rules._modules())


def test_no_module_is_long() -> None:
    rules.test_no_module_is_long()


def test_no_folder_holds_many_modules() -> None:
    rules.test_no_folder_holds_many_modules()


def test_no_import_circles() -> None:
    rules.test_no_import_circles()


def test_library_modules_change_nothing_process_wide_at_import() -> None:
    rules.test_library_modules_change_nothing_process_wide_at_import()
