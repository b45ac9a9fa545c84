"""The one owner of a run's output folder: resumable checkpoints, their rotation, and the final artifacts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from vitacore.checkpoint.resumable import (
    CONFIG_FILE,
    clean_partial_saves,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from vitacore.checkpoint.run_artifacts import StageArtifacts


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


class Checkpointer:
    """Saves, finds and restores ``checkpoint-<step>`` folders and writes the stage artifacts.

    Built once per run, before training: the checkpoint to resume from is decided here, before
    anything is written, so a refused resume leaves the folder untouched.

    Args:
        config: the folder and the rotation / resume settings.
        dist: this process's place in the job (``rank``, ``world_size``, ``is_main``).
        artifacts: the stage artifacts written into every checkpoint and at the end (None: none).
        write_run_config: writes the run's config to a path (``config.yaml``; None: no config file).

    Raises:
        ValueError / FileNotFoundError: a ``resume_from_checkpoint`` that cannot be honoured.
    """

    def __init__(self, config: CheckpointConfig, dist, artifacts: Optional[StageArtifacts] = None,
                 write_run_config: Optional[Callable[[str], None]] = None):
        self.config = config
        self.dist = dist
        self.artifacts = artifacts
        self.write_run_config = write_run_config
        self.resume_path = resolve_resume(config.resume_from_checkpoint, config.output_dir)
        os.makedirs(config.output_dir, exist_ok=True)

    @property
    def output_dir(self) -> str:
        return self.config.output_dir

    def latest(self) -> Optional[str]:
        """The newest complete checkpoint in the output folder, or None."""
        return latest_checkpoint(self.output_dir)

    def load(self, engine, identity: dict) -> Optional[dict]:
        """Remove what killed saves left behind, then restore the checkpoint chosen at construction.

        Every rank calls this. Returns the saved trainer state, or None for a fresh start.

        Raises:
            CheckpointMismatchError: the checkpoint belongs to another run (``identity`` differs).
        """
        if self.dist.is_main:
            clean_partial_saves(self.output_dir)
        if self.resume_path is None:
            return None
        return load_checkpoint(engine, self.resume_path, identity, self.dist)

    def save(self, engine, step: int, trainer_state: dict) -> str:
        """Write ``checkpoint-<step>`` atomically, with the stage artifacts of this moment; every rank calls this."""
        write = (lambda folder: self.artifacts.write(folder, self.dist.is_main)) if self.artifacts else None
        return save_checkpoint(engine, self.output_dir, step, trainer_state, self.dist, write_artifacts=write,
                               write_run_config=self.write_run_config,
                               save_total_limit=self.config.save_total_limit)

    def save_final(self) -> dict[str, str]:
        """The stage's artifacts at the top of the output folder (a full export where one is due) and
        ``config.yaml``; every rank calls this.

        Returns:
            ``{artifact name: path}``.
        """
        written = self.artifacts.write(self.output_dir, self.dist.is_main, final=True) if self.artifacts else {}
        if self.dist.is_main and self.write_run_config is not None:
            # The resolved run config beside the artifacts (merge-lora and export rebuild from it).
            self.write_run_config(os.path.join(self.output_dir, CONFIG_FILE))
        return written
