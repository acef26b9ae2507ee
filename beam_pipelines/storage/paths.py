"""Where inputs live: archive roots, URI schemes, paths that may not escape the root.

Paths are resolved against the archive root and may not escape it, lexically
or through a symlink; absolute URIs are read only when their scheme is
allowed. No Beam import: local checks use the OS, URIs are only parsed.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
from collections.abc import Iterable

_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")


def archive_root_for(metadata: str, given: str | None) -> str:
    """The folder DicomPath is relative to: ``--archive_root`` or the CSV's folder."""
    root = given or (metadata.rsplit("/", 1)[0] if "/" in metadata else ".")
    return root if "://" in root else posixpath.abspath(root)


def uri_scheme(path: str) -> str | None:
    """The scheme of a URI (``gs://…`` -> ``gs``, lower case); None for a local path."""
    match = _URI.match(path)
    return match.group(1).lower() if match else None


def parse_schemes(text: str | None) -> frozenset[str]:
    """``gs,s3`` (``gs://`` also accepted) -> {gs, s3}.

    Raises:
        ValueError: for a name that cannot be a URI scheme.
    """
    schemes = set()
    for item in (text or "").split(","):
        name = item.strip().lower().removesuffix("://").removesuffix(":")
        if not name:
            continue
        if not _SCHEME.match(name):
            raise ValueError(f"not a URI scheme: {item.strip()!r}")
        schemes.add(name)
    return frozenset(schemes)


def allowed_schemes_for(locations: Iterable[str], extra: Iterable[str] = ()) -> frozenset[str]:
    """Schemes a DicomPath URI may use: those of the given locations, plus ``extra``.

    The locations are the ones the user chose on the command line (archive
    root, metadata.csv); local paths need no scheme and are always allowed.
    """
    own = {uri_scheme(location) for location in locations}
    return frozenset({s for s in own if s} | set(extra))


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


@functools.lru_cache(maxsize=4096)
def _real_dir(path: str) -> str:
    """realpath of a folder, cached: the rows of a folder share it."""
    return os.path.realpath(path)


def _real_path(path: str) -> str:
    """realpath of a file: its folder's (cached), then the file itself if a symlink."""
    parent, name = posixpath.split(path)
    real = posixpath.join(_real_dir(parent), name) if name else _real_dir(path)
    return os.path.realpath(real) if os.path.islink(real) else real


def resolve_path(archive_root: str, dicom_path: str) -> str | None:
    """Resolves a DicomPath against the archive root; None if it escapes the root.

    URIs (``gs://…``) are taken as they are (their scheme is checked when
    the row is validated). Relative paths are normalized lexically; ``..``
    that climbs out of the root, and absolute paths outside it, escape. Under
    a local root, a path whose real location (symlinks followed, in the file
    or in any folder on the way) is outside the root's real location escapes
    too; symlinks that stay inside the root are fine. The path returned is
    the lexical one.
    """
    if _URI.match(dicom_path):
        return dicom_path
    root = archive_root.rstrip("/") or "/"
    if _URI.match(root):
        joined = posixpath.normpath(posixpath.join(root.split("://", 1)[1], dicom_path))
        scheme = root.split("://", 1)[0]
        base = posixpath.normpath(root.split("://", 1)[1])
        if not (joined == base or joined.startswith(base + "/")):
            return None
        return f"{scheme}://{joined}"
    joined = posixpath.normpath(posixpath.join(root, dicom_path))
    base = posixpath.normpath(root)
    if not _inside(joined, base):
        return None
    try:
        if not _inside(_real_path(joined), _real_dir(base)):
            return None
    except (OSError, ValueError):  # e.g. a symlink loop, an embedded NUL
        return None
    return joined


def file_identity(resolved: str) -> str:
    """The file a resolved path names: symlinks followed for local paths, URIs as given.

    Two DicomPaths that reach one file through symlinks (a link farm by date
    beside one by patient) are one image: counted twice it could even land
    in two splits. Hard links are separate files here.
    """
    if _URI.match(resolved):
        return resolved
    try:
        return _real_path(resolved)
    except (OSError, ValueError):
        return resolved
