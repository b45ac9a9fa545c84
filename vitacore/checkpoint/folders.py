"""The checkpoint folders of an output folder: which are vitacore's, which count, and how they are
created, published, rotated, set aside and deleted.

Rules (the main rank applies them; the output folder's lock keeps other runs out):

- Only folders that carry vitacore's owner file (``vitacore_checkpoint.json``, written first into
  every folder vitacore creates; checkpoints of earlier versions are recognised by their state file)
  are ever listed, resumed from, rotated, set aside or deleted. A ``checkpoint-<N>/`` written by
  another tool (an HF Trainer's) is left alone.
- A checkpoint counts once its completion marker exists (:mod:`vitacore.checkpoint.manifest`).
- Rotation keeps the newest checkpoints by step and never the one just written.
- Resuming from a checkpoint older than others sets the newer ones aside
  (``abandoned-checkpoint-<N>-<time>/``, never deleted), so a later automatic resume cannot continue
  an abandoned future.
- A complete ``tmp-checkpoint-<N>/`` (a save killed between its marker and its rename) is rolled
  forward; an incomplete one is deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Optional

from vitacore.checkpoint.manifest import (
    COMPLETE_MARKER,
    OWNER_FILE,
    find_problems,
    listed_files,
    write_owner_file,
)
from vitacore.console import logger
from vitacore.durable import fsync_dir

STATE_FILE = "vitacore_state.json"
LEGACY_STATE_FILE = "trainer_state.json"  # what checkpoints of vitacore 0.x before the rename hold
CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = "tmp-checkpoint-"
DELETING_PREFIX = "deleting-checkpoint-"
ABANDONED_PREFIX = "abandoned-checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def is_ours(path: str) -> bool:
    """True for a folder vitacore wrote: its owner file, or (earlier versions) a completion marker next
    to a state file that names vitacore's version."""
    if os.path.isfile(os.path.join(path, OWNER_FILE)):
        return True
    if not os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
        return False
    for name in (STATE_FILE, LEGACY_STATE_FILE):
        try:
            with open(os.path.join(path, name)) as fh:
                state = json.load(fh)
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and "vitacore" in (state.get("versions") or {}):
            return True
    return False


def is_complete(path: str) -> bool:
    """A vitacore checkpoint whose save finished (its completion marker exists)."""
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER)) and is_ours(path)


def _named_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete vitacore checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    return [(step, path) for step, path in _named_checkpoints(output_dir) if is_complete(path)]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint in ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def foreign_checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-<N>`` folders in ``output_dir`` that vitacore did not write (ignored, never touched)."""
    return [path for _, path in _named_checkpoints(output_dir) if not is_ours(path)]


def create_tmp_folder(output_dir: str, step: int) -> str:
    """A fresh ``tmp-checkpoint-<step>/`` carrying the owner file (main rank).

    Raises:
        ValueError: a folder of that name exists and is not vitacore's.
    """
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}{step}")
    if os.path.exists(tmp):
        if not is_ours(tmp):
            raise ValueError(f"{tmp!r} exists and was not written by vitacore; move it away or use another "
                             "--output_dir")
        remove(tmp)
    os.makedirs(tmp)
    write_owner_file(tmp, step)
    fsync_dir(output_dir)
    return tmp


def set_aside(path: str, prefix: str) -> str:
    """Rename a checkpoint folder to ``<prefix><step>-<time>`` in the same folder; the new path."""
    parent, name = os.path.split(os.path.normpath(path))
    step = name.rsplit("-", 1)[-1]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = os.path.join(parent, f"{prefix}{step}-{stamp}")
    suffix = 1
    while os.path.exists(target):
        target = os.path.join(parent, f"{prefix}{step}-{stamp}-{suffix}")
        suffix += 1
    os.replace(path, target)
    fsync_dir(parent)
    return target


def remove(path: str) -> None:
    """Delete a vitacore checkpoint folder so that no half-deleted folder ever looks complete.

    It is renamed to ``deleting-checkpoint-*`` first; the owner file goes last, so a folder whose
    deletion was interrupted is still recognised (and finished) at the next start.
    """
    assert is_ours(path), f"refusing to delete {path!r}: not a vitacore folder"
    name = os.path.basename(os.path.normpath(path))
    if not os.path.isfile(os.path.join(path, OWNER_FILE)):  # an earlier version's checkpoint: mark it first
        write_owner_file(path, step=-1)  # the step is not needed to recognise the folder
    doomed = path if name.startswith(DELETING_PREFIX) else set_aside(path, DELETING_PREFIX)
    if os.path.isfile(os.path.join(doomed, COMPLETE_MARKER)):  # first: a half-deleted folder is never complete
        os.remove(os.path.join(doomed, COMPLETE_MARKER))
    for entry in os.listdir(doomed):
        target = os.path.join(doomed, entry)
        if entry == OWNER_FILE:
            continue
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        else:
            os.remove(target)
    shutil.rmtree(doomed)


def rotate(output_dir: str, limit: int, keep: Optional[str] = None) -> list[str]:
    """Delete the oldest complete checkpoints beyond ``limit``.

    The newest by step are kept, and ``keep`` (the checkpoint just written) always, whatever its step.

    Returns:
        The deleted paths.
    """
    found = list_checkpoints(output_dir)
    kept_path = os.path.normpath(keep) if keep else None
    others = [path for _, path in found if os.path.normpath(path) != kept_path]
    room = max(1, limit) - (1 if kept_path and len(others) < len(found) else 0)
    doomed = others[:max(0, len(others) - room)]
    for path in doomed:
        remove(path)
    return doomed


def move_aside_newer(output_dir: str, step: int) -> list[str]:
    """Set aside the complete checkpoints in ``output_dir`` newer than ``step`` (renamed, never deleted).

    Returns:
        The new paths (``abandoned-checkpoint-<N>-<time>``).
    """
    moved = []
    for found_step, path in list_checkpoints(output_dir):
        if found_step > step:
            target = set_aside(path, ABANDONED_PREFIX)
            logger.info(f"note: resuming from step {step}, so {os.path.basename(path)} (a later step of the run "
                        f"this one leaves behind) is moved to {target}; delete it when it is no longer needed")
            moved.append(target)
    return moved


def _roll_forward(folder: str, output_dir: str) -> Optional[str]:
    """Publish a complete, verifying ``tmp-`` or ``deleting-`` folder as ``checkpoint-<N>`` when no
    such checkpoint exists; None when it does not qualify."""
    step = os.path.basename(folder).split("-")[2]
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    if not step.isdigit() or not os.path.isfile(os.path.join(folder, COMPLETE_MARKER)) or os.path.exists(final):
        return None
    try:
        files = listed_files(folder)
    except ValueError:
        return None
    if files is None or find_problems(folder, files):
        return None
    os.replace(folder, final)
    fsync_dir(output_dir)
    return final


def clean_partial_saves(output_dir: str) -> list[str]:
    """Finish what killed saves and deletions left behind (main rank, before the resume is chosen).

    A complete ``tmp-checkpoint-<N>`` whose files verify and that has no ``checkpoint-<N>`` is
    renamed to it (a save killed between its marker and its rename); failing that, a whole
    ``deleting-checkpoint-<N>-*`` (a replaced checkpoint whose deletion had not begun) is put back.
    Other temporary and half-deleted vitacore folders are deleted; folders vitacore did not write
    are left alone.

    Returns:
        The names handled (rolled forward, put back or deleted).
    """
    handled = []
    if not os.path.isdir(output_dir):
        return handled
    # Temporary folders first: the newer copy of a step wins over the one being replaced.
    leftovers = sorted((n for n in os.listdir(output_dir) if n.startswith((TMP_PREFIX, DELETING_PREFIX))),
                       key=lambda n: (not n.startswith(TMP_PREFIX), n))
    for name in leftovers:
        path = os.path.join(output_dir, name)
        if not os.path.isdir(path):
            continue
        if not is_ours(path):
            logger.info(f"note: {path} was not written by vitacore; left alone")
            continue
        final = _roll_forward(path, output_dir)
        if final is not None:
            logger.info(f"note: {name} was complete (a save or a replacement was interrupted); published it as "
                        f"{os.path.basename(final)}")
        else:
            remove(path)
        handled.append(name)
    return handled
