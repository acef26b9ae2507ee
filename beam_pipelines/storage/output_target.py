"""Where a job's output goes: a folder, or the files of a prefix inside a folder.

The names beside it are the committer's (:mod:`beam_pipelines.storage.committer`):
``.<name>.work`` (the run's private work folder), ``.<name>.previous`` (a
swapped-out output, briefly), ``.<name>.lock`` and the commit record.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

from beam_pipelines.storage.files import is_local, local_path

#: The commit record's file name (a folder output) or suffix (a prefix output).
RECORD = "commit.json"


class OutputRefused(ValueError):
    """The output location cannot be used; the message says why (one line)."""


def join_path(root: str, relative: str) -> str:
    """``relative`` under ``root`` (any filesystem: joined with a slash)."""
    return f"{root.rstrip('/')}/{relative}" if root else relative


@dataclass(frozen=True)
class OutputTarget:
    """Where a job's output goes: a folder, or the files of a prefix inside a folder."""

    parent: str
    name: str
    folder: bool

    @classmethod
    def at(cls, path: str, folder: bool) -> OutputTarget:
        """The target for ``--output_dir`` (folder=True) or a ``--output`` prefix."""
        stripped = path.rstrip("/")
        if not stripped or stripped in (".", ".."):
            raise OutputRefused(f"{path!r} cannot be an output: name a folder of its own")
        if is_local(stripped):
            # One spelling per output, so one lock: a symlinked folder is its target.
            local = local_path(stripped)
            head, tail = os.path.split(local)
            stripped = (
                os.path.realpath(local)
                if folder
                else os.path.join(os.path.realpath(head or "."), tail)
            )
        parent, name = posixpath.split(stripped)
        if name in (".", ".."):
            raise OutputRefused(f"{path!r} cannot be an output: name a folder of its own")
        return cls(parent or ".", name, folder)

    @property
    def path(self) -> str:
        return join_path(self.parent, self.name)

    @property
    def root(self) -> str:
        """The folder the committed files are relative to."""
        return self.path if self.folder else self.parent

    @property
    def work(self) -> str:
        return join_path(self.parent, f".{self.name}.work")

    @property
    def previous(self) -> str:
        return join_path(self.parent, f".{self.name}.previous")

    @property
    def lock(self) -> str:
        return join_path(self.parent, f".{self.name}.lock")

    @property
    def record_name(self) -> str:
        return RECORD if self.folder else f"{self.name}.{RECORD}"

    def job_path(self) -> str:
        """What the job writes to: the work folder, or the prefix inside it."""
        return self.work if self.folder else join_path(self.work, self.name)
