"""What makes a checkpoint folder complete and whole: every file fsynced, then a completion marker that
lists every file with its size and sha256, checked again on resume.

The marker (``checkpoint_complete.json``) is written last, after every file and folder of the
checkpoint is on disk, so a folder with the marker holds everything the marker lists. Hashing is
split across ranks (each rank hashes a share, about equal in bytes), and so is the check on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Optional

from vitacore import ranks
from vitacore.durable import fsync_dir, fsync_file, fsync_tree

COMPLETE_MARKER = "checkpoint_complete.json"
OWNER_FILE = "vitacore_checkpoint.json"  # written first into every folder vitacore creates for a checkpoint
OWNER_FORMAT = "vitacore-checkpoint"
MARKER_VERSION = 2  # 1: {"step", "time"} only (no file list)
_CHUNK = 1 << 22


def list_files(root: str) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``root`` but the completion marker (``/``-separated)."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            if relative != COMPLETE_MARKER:
                found[relative] = os.path.getsize(path)
    return found


def share_of(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """The files ``rank`` hashes: the largest first, each to the rank with the fewest bytes so far.

    Every rank computes the same split from the same listing, so no exchange is needed.
    """
    loads = [0] * world_size
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        owner = loads.index(min(loads))
        loads[owner] += sizes[name]
        if owner == rank:
            mine.append(name)
    return mine


def sha256_of(path: str) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(root: str) -> dict[str, dict]:
    """fsync and hash this rank's share of the files under ``root``; every rank calls this (collective).

    Returns:
        ``{relative path: {"size", "sha256"}}`` of every file, on every rank.

    Raises:
        ValueError / OSError: on every rank when any rank could not read its share (naming the file).
    """
    sizes = list_files(root)
    entries: dict[str, dict] = {}
    with ranks.together(f"hashing the files of {root}"):
        for name in share_of(sizes, ranks.this_rank(), ranks.world_size()):
            path = os.path.join(root, name)
            fsync_file(path)
            entries[name] = {"size": os.path.getsize(path), "sha256": sha256_of(path)}
    merged: dict[str, dict] = {}
    for part in ranks.gather_all(entries):
        merged.update(part)
    return dict(sorted(merged.items()))


def write_owner_file(folder: str, step: int) -> None:
    """Mark ``folder`` as vitacore's (only folders with this file are ever deleted or resumed)."""
    path = os.path.join(folder, OWNER_FILE)
    with open(path, "w") as fh:
        json.dump({"format": OWNER_FORMAT, "step": step}, fh)
        fh.flush()
        os.fsync(fh.fileno())


def write_complete_marker(folder: str, step: int, files: dict[str, dict]) -> None:
    """Write the completion marker last, fsynced with the folder (main rank; every file already fsynced)."""
    fsync_tree(folder, files=False)
    with open(os.path.join(folder, COMPLETE_MARKER), "w") as fh:
        json.dump({"format": OWNER_FORMAT, "version": MARKER_VERSION, "step": step, "time": time.time(),
                   "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(folder)


def read_marker(folder: str) -> dict:
    """The completion marker of ``folder``.

    Raises:
        ValueError: it is not readable JSON (naming the file).
    """
    return read_json_object(os.path.join(folder, COMPLETE_MARKER), "the completion marker")


def read_json_object(path: str, what: str) -> dict:
    """A checkpoint's JSON file that must hold an object.

    Raises:
        ValueError: unreadable, not JSON, or not an object (naming the file and ``what`` it is).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read {what} ({err}); the checkpoint is damaged") from err
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: {what} is not a JSON object; the checkpoint is damaged")
    return loaded


def find_problems(folder: str, files: dict[str, dict], rank: int = 0, world_size: int = 1) -> list[str]:
    """Check ``files`` (a marker's list) against ``folder``: every size on each rank, ``rank``'s share of hashes.

    Returns:
        One line per problem, naming the file relative to the folder's parent (``checkpoint-4/state/...``).
    """
    label = os.path.basename(os.path.normpath(folder))
    problems = []
    sizes = {}
    for name, entry in sorted(files.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problems.append(f"{label}/{name}: missing (the folder was partly copied or a file was deleted)")
            continue
        sizes[name] = size = os.path.getsize(path)
        if size != entry.get("size"):
            problems.append(f"{label}/{name}: size {size}, expected {entry.get('size')} (truncated or partly copied)")
    for name in share_of({n: s for n, s in sizes.items() if s == files[n].get("size")}, rank, world_size):
        if sha256_of(os.path.join(folder, name)) != files[name].get("sha256"):
            problems.append(f"{label}/{name}: content differs from what was saved (sha256 mismatch: corrupted "
                            "or replaced)")
    return problems


def listed_files(folder: str) -> Optional[dict[str, dict]]:
    """The marker's file list, or None for a checkpoint written before markers listed files."""
    files = read_marker(folder).get("files")
    if files is None:
        return None
    if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
        raise ValueError(f"{os.path.join(folder, COMPLETE_MARKER)}: the file list is malformed; the checkpoint "
                         "is damaged")
    return files
