"""Writes that survive a kill or a power loss: fsync helpers and the write-then-rename pattern.

Used by checkpoints, exports, run records and the data package's length cache, so it depends on
nothing else in vitacore.
"""

from __future__ import annotations

import os
import uuid
from typing import Callable

__all__ = ["atomic_write", "atomic_write_bytes", "fsync_dir", "fsync_file", "fsync_tree"]


def fsync_file(path: str) -> None:
    """Flush one file's data to the disk (its writer may have been another process)."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (the names created, renamed or removed in it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str, files: bool = True) -> None:
    """fsync every file (``files``) and every folder under ``root``, folders after what they hold."""
    for folder, _, names in os.walk(root, topdown=False):
        if files:
            for name in names:
                fsync_file(os.path.join(folder, name))
        fsync_dir(folder)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(temporary path)`` in the same folder, fsync the file, rename it to ``path``, fsync the folder:
    a kill or power loss leaves the old file or the complete new one, never half a file or a lost rename.

    The temporary name is unique per call, so two processes writing the same path never share one.
    """
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """``data`` at ``path`` through :func:`atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)
