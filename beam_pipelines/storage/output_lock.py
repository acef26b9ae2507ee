"""One run per output at a time: a lock file beside the output.

On local and POSIX filesystems the lock is an ``flock`` on
``<parent>/.<name>.lock``: the kernel releases it when its holder dies, so a
killed run's lock is taken over at once, and NFS forwards it to the server.
The file holds the holder's host, pid and start time for the message a second
run prints; it is never deleted (deleting a locked file lets a third run lock
a new inode beside the old holder).

Object stores have no locks, and Beam's FileSystems no conditional create:
there the lock is an object written when none exists and removed at the end.
Two runs started in the same instant can both see none; a lock of a dead
process on this host is taken over, one from another host must be removed by
hand (the message names it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import IO, Any

from beam_pipelines.storage.files import is_local


class OutputLocked(RuntimeError):
    """Another run holds the output's lock."""


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _describe(raw: bytes | str) -> str:
    try:
        holder = json.loads(raw)
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLock:
    """An exclusive lock on one output, held from before any work to after its commit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._handle: IO[bytes] | None = None
        self._object = False

    def acquire(self) -> None:
        """Takes the lock or raises :class:`OutputLocked` naming the holder.

        Raises:
            OutputLocked: another live run holds it.
            OSError: the lock file cannot be created (read-only folder, …).
        """
        if is_local(self.path):
            self._acquire_flock()
        else:
            self._acquire_object()

    def _acquire_flock(self) -> None:
        import fcntl

        handle = open(self.path, "a+b")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe(handle.read())
            handle.close()
            raise OutputLocked(
                f"another run is writing this output ({holder}); lock: {self.path}"
            ) from None
        except BaseException:
            handle.close()
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_holder()).encode("utf-8"))
        handle.flush()
        self._handle = handle

    def _acquire_object(self) -> None:
        from apache_beam.io.filesystems import FileSystems

        from beam_pipelines.storage.files import read_bytes, write_text

        if FileSystems.exists(self.path):
            raw = read_bytes(self.path)
            try:
                holder = json.loads(raw)
                stale = holder["host"] == socket.gethostname() and not _alive(int(holder["pid"]))
            except (ValueError, KeyError, TypeError):
                stale = False
            if not stale:
                raise OutputLocked(
                    f"another run is writing this output ({_describe(raw)}); if it is not "
                    f"running any more, remove the lock object {self.path}"
                )
        write_text(self.path, json.dumps(_holder()))
        self._object = True

    def release(self) -> None:
        """Releases the lock (idempotent)."""
        if self._handle is not None:
            self._handle.close()  # closing releases the flock
            self._handle = None
        if self._object:
            from apache_beam.io.filesystems import FileSystems

            with contextlib.suppress(OSError):
                FileSystems.delete([self.path])
            self._object = False
