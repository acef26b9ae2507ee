"""Snapshots of written outputs, to compare runs byte for byte."""

from __future__ import annotations

from pathlib import Path


def output_files(root: Path) -> dict[str, bytes]:
    """Every file below root, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
