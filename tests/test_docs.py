"""The documentation stays inside the repository, and what it names exists.

Checked on every Markdown file of the repository (``git ls-files '*.md'``,
plus README.md, data/README.md and docs/**/*.md as they are on disk):

- Links (``[text](target)``, ``[id]: target``, ``href``/``src``) are relative
  paths that resolve inside the repository and exist, and an ``#anchor`` names
  a heading of its page (GitHub's slugs). No ``file://``, no absolute paths.
- No web links at all: ``http(s)://`` only to a host in :data:`ALLOWED_HOSTS`,
  which is empty on purpose. The docs must read the same in a clone with no
  network, and point at nothing that can move or vanish; public data sets and
  papers are named by citation (authors, venue, year), which a reader can
  look up.
- No path leaves the clone: no ``../`` climbing out of the repository root
  (text paths are taken from the root, where the docs' commands run; link
  targets from their page's folder), and no absolute path into a developer's
  machine (``/work/…``, ``/home/…``, the folder the clone sits in, …).
  Scratch folders in benchmark commands (``/tmp/…``) and tool caches
  (``~/.keras``, ``~/.m2``) are fine: they are the user's own.
- Repository paths the docs name (``beam_pipelines/…/x.py``, ``tests/…py``,
  ``benchmarks/x.py``, ``docs/x.md``, source folders, and short
  ``contracts/x.py``-style paths inside ``beam_pipelines/``) exist, and dotted
  module names (``beam_pipelines.dicom.read_image``) name a module, or a name
  a package's ``__init__`` defines.
- README.md stays a front door: at most :data:`README_MAX_LINES` lines.
- docs/dicom.md lists every decode reject reason (docs/metadata.md's
  validation reasons: tests/beam_pipelines/test_metadata_robustness.py).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

from beam_pipelines.dicom import REJECT_REASONS

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 210
#: Hosts ``http(s)://`` links may point at. Empty: the docs link nowhere outside.
ALLOWED_HOSTS: frozenset[str] = frozenset()
#: Absolute path prefixes of developers' machines, never valid in a clone.
FOREIGN_ROOTS = ("/work/", "/home/", "/Users/", "/root/", "/mnt/", "/srv/", "/shared/")
#: Scratch folders the docs' benchmark commands may use, also when the clone sits in one.
SCRATCH_ROOTS = ("/tmp/", "/var/tmp/")
#: Top-level folders whose files the docs name.
SOURCE_DIRS = (
    "beam_pipelines",
    "trainer",
    "analysis",
    "archive_tools",
    "engines",
    "explain",
    "benchmarks",
    "tests",
    "docs",
    "data",
)
#: Folders a trailing-slash path is checked for; "analysis/" and "data/…/"
#: are also names of job outputs, so they are left out.
FOLDER_CHECKED = ("beam_pipelines", "trainer", "archive_tools", "engines", "benchmarks", "tests")
FOLDER_CHECKED += ("docs",)
#: Short paths the docs use for beam_pipelines' subpackages (``contracts/splits.py``).
SUBPACKAGES = ("contracts", "storage", "transforms", "dicom")
PYTHON_PACKAGES = ("beam_pipelines", "trainer", "analysis", "archive_tools", "engines", "explain")

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_HTML_ATTR = re.compile(r"""(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
_URL = re.compile(r"\b(https?|ftp|file)://[^\s`'\"<>)\]]+", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_PATH_TOKEN = re.compile(r"[^\s`'\"()<>\[\]{}|,;]+")
_TOPS = "|".join(SOURCE_DIRS + SUBPACKAGES)
_REPO_PATH = re.compile(rf"(?<![\w./~$-])((?:{_TOPS})/[\w./-]*)")
_MODULE = re.compile(rf"(?<![\w./-])((?:{'|'.join(PYTHON_PACKAGES)})(?:\.[A-Za-z_]\w*)+)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def markdown_files() -> list[Path]:
    """Every Markdown file the repository holds (tracked, and the docs on disk)."""
    found: set[Path] = set()
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "*.md"], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
        found.update(ROOT / name for name in listed.split("\0") if name)
    except (OSError, subprocess.CalledProcessError):
        pass  # not a git checkout: the files on disk below
    found.update([ROOT / "README.md", ROOT / "data" / "README.md"])
    found.update((ROOT / "docs").rglob("*.md"))
    return sorted(path for path in found if path.is_file())


def _prose_lines(text: str) -> Iterator[tuple[int, str, bool]]:
    """(line number, line, inside a fenced code block) for every line."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            yield number, line, True
            continue
        yield number, line, fenced


def _links(text: str) -> Iterator[tuple[int, str]]:
    """Link targets outside code: inline links, images, HTML attributes, reference definitions."""
    for number, line, fenced in _prose_lines(text):
        if fenced:
            continue
        prose = _INLINE_CODE.sub("", line)
        for match in _LINK.finditer(prose):
            yield number, match.group(1)
        for match in _HTML_ATTR.finditer(prose):
            yield number, match.group(1)
        for match in _REF_DEF.finditer(prose):
            yield number, match.group(1)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings (duplicates numbered as GitHub does)."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, line, fenced in _prose_lines(page.read_text(encoding="utf-8")):
        match = None if fenced else _HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def _inside(path: Path) -> bool:
    return path == ROOT or ROOT in path.parents


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _link_problem(page: Path, target: str) -> str | None:
    if not target:
        return "empty link"
    if _SCHEME.match(target):
        scheme = target.split(":", 1)[0].lower()
        host = re.sub(r"^[a-z]+://", "", target.lower()).split("/", 1)[0]
        if scheme in ("http", "https") and host in ALLOWED_HOSTS:
            return None
        return f"links outside the repository: {target}"
    path_part, _, fragment = target.partition("#")
    path_part = path_part.split("?", 1)[0]
    if path_part.startswith(("/", "~")):
        return f"absolute path: {target}"
    resolved = (page.parent / path_part).resolve() if path_part else page
    if not _inside(resolved):
        return f"leaves the repository: {target}"
    if not resolved.exists():
        return f"no such file: {target}"
    if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
        return f"no heading #{fragment} in {_rel(resolved)}"
    return None


def test_links_resolve_inside_the_repository() -> None:
    problems = []
    for page in markdown_files():
        for number, target in _links(page.read_text(encoding="utf-8")):
            problem = _link_problem(page, target)
            if problem:
                problems.append(f"{_rel(page)}:{number}: {problem}")
    assert not problems, "\n".join(problems)


def test_no_web_or_file_urls() -> None:
    problems = []
    for page in markdown_files():
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for match in _URL.finditer(line):
                url = match.group(0)
                host = url.split("://", 1)[1].split("/", 1)[0].lower()
                if match.group(1).lower() in ("http", "https") and host in ALLOWED_HOSTS:
                    continue
                problems.append(f"{_rel(page)}:{number}: {url}")
    assert not problems, "URLs leave the repository:\n" + "\n".join(problems)


def test_no_path_leaves_the_clone() -> None:
    foreign = [*FOREIGN_ROOTS]
    parent = f"{ROOT.parent}/"
    if ROOT.parent != Path(ROOT.anchor) and parent not in SCRATCH_ROOTS:
        foreign.append(parent)
    problems = []
    for page in markdown_files():
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            text = _LINK.sub("", line)  # link targets: the link test, from the page's folder
            for token in _PATH_TOKEN.findall(text):
                token = token.split("=", 1)[-1]  # --flag=PATH
                if "../" in token and not _inside((ROOT / token).resolve()):
                    problems.append(f"{_rel(page)}:{number}: {token} leaves the repository")
                if token.startswith(tuple(foreign)):
                    problems.append(f"{_rel(page)}:{number}: {token} is a path on one machine")
    assert not problems, "\n".join(problems)


def _path_problem(token: str) -> str | None:
    path = token.rstrip(".")  # a sentence's full stop
    top = path.split("/", 1)[0]
    if top in SUBPACKAGES:
        path = f"beam_pipelines/{path}"
        top = "beam_pipelines"
    if path.endswith("/"):
        if top in FOLDER_CHECKED and not (ROOT / path).is_dir():
            return f"no folder {path}"
        return None
    if path.endswith((".py", ".c", ".md", ".toml", ".cfg")) and not (ROOT / path).is_file():
        return f"no file {path}"
    return None


def _module_problem(dotted: str) -> str | None:
    parts = dotted.split(".")
    here = ROOT / parts[0]
    for index, part in enumerate(parts[1:], 1):
        if (here / part).is_dir():
            here = here / part
        elif (here / f"{part}.py").is_file():
            return None  # the rest are attributes of that module
        elif here.is_dir() and re.search(rf"\b{re.escape(part)}\b", _init_text(here)):
            return None  # a name the package defines or re-exports
        else:
            return f"no module or package name {'.'.join(parts[: index + 1])}"
    return None if here.is_dir() else f"no package {dotted}"


def _init_text(package: Path) -> str:
    init = package / "__init__.py"
    return init.read_text(encoding="utf-8") if init.is_file() else ""


def test_named_repository_paths_and_modules_exist() -> None:
    problems = []
    for page in markdown_files():
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            text = _LINK.sub(lambda m: m.group(0).split("](", 1)[0], line)
            for match in _REPO_PATH.finditer(text):
                problem = _path_problem(match.group(1))
                if problem:
                    problems.append(f"{_rel(page)}:{number}: {problem}")
            for match in _MODULE.finditer(text):
                problem = _module_problem(match.group(1).rstrip("."))
                if problem:
                    problems.append(f"{_rel(page)}:{number}: {problem}")
    assert not problems, "stale names in the docs:\n" + "\n".join(problems)


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_dicom_page_lists_every_decode_reason() -> None:
    page = (ROOT / "docs" / "dicom.md").read_text(encoding="utf-8")
    missing = sorted(r for r in REJECT_REASONS if f"`{r}`" not in page)
    assert not missing, f"docs/dicom.md lists no {missing}"


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """The rules above on known-bad input, so a broken regex cannot pass silently."""
    page = ROOT / "docs" / "x.md"
    assert _link_problem(page, "../../shared/data/README.md") is not None
    assert _link_problem(page, "https://example.org/a") is not None
    assert _link_problem(page, "file:///etc/passwd") is not None
    assert _link_problem(page, "/work/main/README.md") is not None
    assert _link_problem(page, "missing.md") is not None
    assert _link_problem(page, "architecture.md#no-such-heading") is not None
    assert _link_problem(page, "architecture.md") is None
    assert _link_problem(page, "../README.md#two-commands") is None
    assert [t for _, t in _links("[a](x.md) `[b](y.md)`\n```\n[c](z.md)\n```\n")] == ["x.md"]
    assert _path_problem("beam_pipelines/no_such_module.py") is not None
    assert _path_problem("contracts/splits.py") is None
    assert _path_problem("tests/no_such_folder/") is not None
    assert _module_problem("beam_pipelines.dicom.read_image") is None
    assert _module_problem("beam_pipelines.contracts.records.parse_example") is None
    assert _module_problem("beam_pipelines.no_such_module") is not None
    assert slug("Batch scoring: `xray-score`") == "batch-scoring-xray-score"
    assert slug("Model (trainer → scorer, analysis)") == "model-trainer--scorer-analysis"
