"""The one owner of a run's output folder: its lock, resumable checkpoints, their rotation, and the final artifacts."""

from __future__ import annotations

import os
import shutil
import weakref
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from vitacore import ranks
from vitacore.checkpoint import folders
from vitacore.checkpoint.export.writer import publish_into
from vitacore.checkpoint.lock import OutputLock
from vitacore.checkpoint.resumable import (
    CONFIG_FILE,
    clean_partial_saves,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from vitacore.checkpoint.resume_config import parse_allowed
from vitacore.checkpoint.run_artifacts import StageArtifacts
from vitacore.console import logger
from vitacore.durable import fsync_tree

FINAL_STAGING = "tmp-final-artifacts"  # beside the final artifacts; the lock keeps it to one run


@dataclass(frozen=True)
class CheckpointConfig:
    """Where a run writes and what it resumes from.

    Attributes:
        output_dir: the run's folder (checkpoints, artifacts, ``metrics.jsonl``).
        save_total_limit: keep at most this many complete checkpoints (None: all).
        resume_from_checkpoint: ``--resume_from_checkpoint``: unset (the newest checkpoint, if any),
            ``"True"``, ``"False"`` or a path (see :func:`vitacore.checkpoint.resolve_resume`).
    """

    output_dir: str = "output"
    save_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    allow_resume_changes: Optional[str] = None


def _open_output_dir(config: CheckpointConfig) -> tuple[OutputLock, Optional[str]]:
    """Main rank: lock the folder, finish interrupted saves, then choose the checkpoint to resume."""
    os.makedirs(config.output_dir, exist_ok=True)
    lock = OutputLock.acquire(config.output_dir)
    try:
        clean_partial_saves(config.output_dir)
        for path in folders.foreign_checkpoints(config.output_dir):
            logger.info(f"note: {path} was not written by vitacore; it is never resumed from, rotated or deleted")
        return lock, resolve_resume(config.resume_from_checkpoint, config.output_dir)
    except BaseException:
        lock.release()
        raise


class Checkpointer:
    """Saves, finds and restores ``checkpoint-<step>`` folders and writes the stage artifacts.

    Built once per run, on every rank, before training. The main rank takes the output folder's
    lock (a second run on the folder is refused, naming the holder), finishes what interrupted saves
    left (a complete temporary checkpoint is published, an incomplete one deleted), and decides the
    checkpoint to resume from; every rank gets that decision. :meth:`close` releases the lock (the
    operating system does when the process ends, if it is never called).

    Args:
        config: the folder and the rotation / resume settings.
        dist: this process's place in the job (``rank``, ``world_size``, ``is_main``).
        artifacts: the stage artifacts written into every checkpoint and at the end (None: none).
        write_run_config: writes the run's config to a path (``config.yaml``; None: no config file).
        run_config: this run's flat resolved config; a resume compares it with the checkpoint's
            ``config.yaml`` and refuses changes not named in ``config.allow_resume_changes`` (None: no
            comparison).

    Raises:
        ValueError / FileNotFoundError: the folder is locked by another run, or a
            ``resume_from_checkpoint`` that cannot be honoured (on every rank).
    """

    def __init__(self, config: CheckpointConfig, dist, artifacts: Optional[StageArtifacts] = None,
                 write_run_config: Optional[Callable[[str], None]] = None,
                 run_config: Optional[Mapping] = None):
        self.config = config
        self.run_config = run_config
        self.dist = dist
        self.artifacts = artifacts
        self.write_run_config = write_run_config
        self._lock: Optional[OutputLock] = None
        resume_path = None
        with ranks.together(f"opening the output folder {config.output_dir}"):
            if dist.is_main:
                self._lock, resume_path = _open_output_dir(config)
        if self._lock is not None:  # released when the checkpointer is collected, if close() never runs
            self._finalizer = weakref.finalize(self, self._lock.release)
        self.resume_path: Optional[str] = ranks.broadcast_from_main(resume_path)

    @property
    def output_dir(self) -> str:
        return self.config.output_dir

    def close(self) -> None:
        """Release the output folder's lock (idempotent; every rank may call it)."""
        if self._lock is not None:
            self._lock.release()

    def latest(self) -> Optional[str]:
        """The newest complete checkpoint in the output folder, or None."""
        return latest_checkpoint(self.output_dir)

    def load(self, engine, identity: dict) -> Optional[dict]:
        """Restore the checkpoint chosen at construction; every rank calls this.

        The checkpoint's files are verified first (every rank a share; all refuse together, naming
        the damaged file). After a successful restore, checkpoints in the output folder newer than
        the one resumed are set aside (``abandoned-checkpoint-<N>-<time>/``), so neither rotation
        nor a later automatic resume picks up the abandoned continuation.

        Returns:
            The saved trainer state, or None for a fresh start.

        Raises:
            CheckpointMismatchError: the checkpoint belongs to another run (``identity`` differs).
            ValueError / FileNotFoundError: a damaged checkpoint, naming the file.
        """
        if self.resume_path is None:
            return None
        state = load_checkpoint(engine, self.resume_path, identity, self.dist, self.run_config,
                                parse_allowed(self.config.allow_resume_changes))
        with ranks.together(f"setting aside checkpoints newer than {self.resume_path}"):
            if self.dist.is_main:
                folders.move_aside_newer(self.output_dir, int(state["step"]))
        return state

    def save(self, engine, step: int, trainer_state: dict) -> str:
        """Write ``checkpoint-<step>`` atomically, with the stage artifacts of this moment; every rank calls this."""
        write = (lambda folder: self.artifacts.write(folder, self.dist.is_main)) if self.artifacts else None
        return save_checkpoint(engine, self.output_dir, step, trainer_state, self.dist, write_artifacts=write,
                               write_run_config=self.write_run_config,
                               save_total_limit=self.config.save_total_limit)

    def save_final(self) -> dict[str, str]:
        """The stage's artifacts at the top of the output folder (a full export where one is due) and
        ``config.yaml``; every rank calls this.

        Everything is written into ``tmp-final-artifacts/`` inside the output folder, fsynced, then
        each file or subfolder replaces the previous one by a rename: a kill leaves every artifact
        either as it was or new, never half written.

        Returns:
            ``{artifact name: path}``.
        """
        staging = os.path.join(self.output_dir, FINAL_STAGING)
        with ranks.together(f"preparing {staging}"):
            if self.dist.is_main:
                shutil.rmtree(staging, ignore_errors=True)
                os.makedirs(staging)
        with ranks.together(f"publishing the final artifacts of {self.output_dir}"):
            written = self.artifacts.write(staging, self.dist.is_main, final=True) if self.artifacts else {}
            if self.dist.is_main:
                if self.write_run_config is not None:
                    # The resolved run config beside the artifacts (merge-lora and export rebuild from it).
                    self.write_run_config(os.path.join(staging, CONFIG_FILE))
                fsync_tree(staging)
                own = frozenset(os.listdir(staging)) - {"config.json"}  # a foreign config.json stays refused
                publish_into(staging, self.output_dir, replaceable=own)
        return {name: os.path.normpath(os.path.join(self.output_dir, os.path.relpath(path, staging))) if path else path
                for name, path in written.items()}
