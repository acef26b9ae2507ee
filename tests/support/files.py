"""Snapshots of written outputs, to compare runs byte for byte."""

from __future__ import annotations

from pathlib import Path


def is_job_log(path: Path) -> bool:
    """A job's log (``logs/<job>.log`` beside its output): it grows run after run, no output."""
    return path.parent.name == "logs" and path.name.startswith("xray-") and path.suffix == ".log"


def output_files(root: Path) -> dict[str, bytes]:
    """Every file below root, by relative path (job logs aside)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not is_job_log(p)
    }
