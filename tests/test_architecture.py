"""The house rules of the folder tree, checked on the source (docs/architecture.md).

Modules stay small and folders short; no import circles; the contracts and
the DICOM decoder import neither Beam nor TensorFlow; library modules change
nothing process-wide when imported (entry points set up logging and filters).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("beam_pipelines", "trainer", "analysis", "archive_tools", "engines", "explain")
MAX_LINES = 560  # "no module over ~500 lines"
MAX_MODULES_PER_FOLDER = 12
#: Imports a package's modules may not make (at any level of the file).
FORBIDDEN = {
    "beam_pipelines/contracts": ("apache_beam", "tensorflow", "keras"),
    "beam_pipelines/dicom": ("apache_beam", "tensorflow", "keras"),
}
#: Calls that change the whole process: for entry points, never at a library's import.
PROCESS_WIDE = {
    ("logging", "basicConfig"),
    ("warnings", "filterwarnings"),
    ("warnings", "simplefilter"),
    ("matplotlib", "use"),
}
PROCESS_WIDE_METHODS = {"addFilter", "addHandler", "setLevel"}


def _modules() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, module: str, top_level_only: bool) -> Iterator[str]:
    """Dotted names a module imports (relative imports resolved)."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level] if node.level else []
                base = ".".join([*parent, base]) if base else ".".join(parent)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    known = {_name(path): path for path in _modules()}
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = {t for t in _imports(tree, name, top_level_only=True) if t in known}
        graph[name] = targets - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_is_long() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for path in _modules()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_folder_holds_many_modules() -> None:
    folders: dict[str, int] = {}
    for path in _modules():
        if path.name != "__init__.py":
            key = str(path.parent.relative_to(ROOT))
            folders[key] = folders.get(key, 0) + 1
    crowded = {folder: n for folder, n in folders.items() if n > MAX_MODULES_PER_FOLDER}
    assert not crowded, f"folders over {MAX_MODULES_PER_FOLDER} modules: {crowded}"


def test_no_import_circles() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_contracts_and_decoder_import_neither_beam_nor_tensorflow(folder: str) -> None:
    offending = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for name in _imports(tree, _name(path), top_level_only=False):
            if name.split(".")[0] in FORBIDDEN[folder]:
                offending.append(f"{path.relative_to(ROOT)}: {name}")
    assert offending == []


def _process_wide_calls(tree: ast.Module) -> Iterator[str]:
    """Calls at module level (outside functions and classes) that change the whole process."""
    for statement in tree.body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        if isinstance(statement, ast.If) and "__main__" in ast.unparse(statement.test):
            continue
        for node in ast.walk(statement):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = ast.unparse(node.func.value)
            if (owner, node.func.attr) in PROCESS_WIDE or node.func.attr in PROCESS_WIDE_METHODS:
                yield ast.unparse(node)


def test_library_modules_change_nothing_process_wide_at_import() -> None:
    found = [
        f"{path.relative_to(ROOT)}: {call}"
        for path in _modules()
        for call in _process_wide_calls(ast.parse(path.read_text(), str(path)))
    ]
    assert found == []


def test_the_side_effect_finder_sees_a_filter_installed_at_import() -> None:
    source = "import logging\nlogging.getLogger('x').addFilter(f)\ndef main():\n    g()\n"
    assert list(_process_wide_calls(ast.parse(source))) == ["logging.getLogger('x').addFilter(f)"]
