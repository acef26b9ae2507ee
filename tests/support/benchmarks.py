"""Loading the benchmark scripts (a script folder, not an installed package)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from tests.support.data import REPO

BENCHMARKS = REPO / "benchmarks"


@contextmanager
def loaded_script(name: str) -> Iterator[ModuleType]:
    """Imports ``benchmarks/<name>.py`` by path for the duration of the block.

    The module is registered in sys.modules while loaded: dataclasses look
    their module up there while the class is built.
    """
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
