"""Resumable checkpoints: ``output_dir/checkpoint-<step>/``, written whole, published atomically, verified on resume.

A checkpoint folder holds:

- ``vitacore_checkpoint.json``: written first; marks the folder as vitacore's (only such folders are
  ever deleted, rotated or resumed from: see :mod:`vitacore.checkpoint.folders`);
- ``state/`` + ``latest``: DeepSpeed's engine state of the trainable parameters only, with optimizer
  and scheduler (``zero_to_fp32.py`` beside them when ZeRO wrote partitioned optimizer state);
- ``rng_state_<rank>.pth``: each rank's python / numpy / torch / CUDA generator states (plain tensors);
- ``vitacore_state.json``: step, epoch, data position, the run's identity (what must match to resume)
  and library versions (vitacore's own schema, so not named like the HF Trainer's ``trainer_state.json``;
  checkpoints written before the rename are still read under that old name); ``config.yaml``: the resolved run config;
- the stage artifacts of that moment (``mm_projector.bin``, ...);
- ``checkpoint_complete.json``, written last: every other file with its size and sha256
  (:mod:`vitacore.checkpoint.manifest`).

Everything is written into ``tmp-checkpoint-<step>/``, fsynced, listed in the marker, and renamed
when complete, so a kill at any moment leaves either the finished folder or a temporary one (rolled
forward at the next start when it is complete, deleted when it is not). On resume every rank checks
its share of the listed files and all refuse together, naming the damaged ones.

DeepSpeed's ``engine.load_checkpoint`` unpickles its own files in full (``state/*.pt``), which can run
code stored in them: resume only from checkpoints you or your own runs wrote. vitacore's own files
are read without running code.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Callable, Mapping, Optional

import torch

from vitacore import ranks
from vitacore.checkpoint import folders
from vitacore.checkpoint.folders import (
    LEGACY_STATE_FILE,
    STATE_FILE,
    TMP_PREFIX,
    clean_partial_saves,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    rotate,
)
from vitacore.checkpoint.identity import CheckpointMismatchError, check_identity, run_identity
from vitacore.checkpoint.manifest import (
    COMPLETE_MARKER,
    describe_files,
    find_problems,
    listed_files,
    write_complete_marker,
)
from vitacore.checkpoint.resume_config import check_resume_changes, compare_configs, read_saved_config
from vitacore.checkpoint.state_files import (
    load_rng,
    read_trainer_state,
    restore_rng,
    save_rng,
    versions,
    write_trainer_state,
)
from vitacore.console import logger
from vitacore.durable import fsync_dir

CONFIG_FILE = "config.yaml"
DEEPSPEED_TAG = "state"

__all__ = [
    "COMPLETE_MARKER", "CONFIG_FILE", "CheckpointMismatchError", "DEEPSPEED_TAG", "LEGACY_STATE_FILE", "STATE_FILE",
    "check_identity", "clean_partial_saves", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
    "read_trainer_state", "resolve_resume", "rotate", "run_identity", "save_checkpoint", "verify_checkpoint",
]


def resolve_resume(resume_flag: Optional[str], output_dir: str) -> Optional[str]:
    """The checkpoint to resume from, following ``--resume_from_checkpoint``.

    - unset: the newest complete checkpoint in ``output_dir`` if there is one, else a fresh start;
    - ``True``: the newest one, and an error when there is none;
    - ``False``: a fresh start, refused when ``output_dir`` already holds checkpoints;
    - a path: that checkpoint (a ``checkpoint-<step>`` folder, or an output folder: its newest).

    Only folders vitacore wrote count (another tool's ``checkpoint-<N>/`` is never resumed from).

    Raises:
        ValueError / FileNotFoundError: naming the flag and the folder.
    """
    value = None if resume_flag is None else str(resume_flag).strip()
    lowered = (value or "").lower()
    if lowered in ("false", "0", "no"):
        existing = list_checkpoints(output_dir)
        if existing:
            raise ValueError(f"--resume_from_checkpoint False: {output_dir!r} already holds {len(existing)} "
                             f"checkpoint(s) (newest {existing[-1][1]!r}); choose another --output_dir, delete "
                             "them, or drop the flag to resume")
        return None
    if not value:
        return latest_checkpoint(output_dir)
    if lowered in ("true", "1", "yes"):
        found = latest_checkpoint(output_dir)
        if found is None:
            raise FileNotFoundError(f"--resume_from_checkpoint True: no complete checkpoint in {output_dir!r}")
        return found
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value!r}: no such folder")
    if is_complete(value):
        return value
    if os.path.exists(os.path.join(value, COMPLETE_MARKER)) or os.path.exists(os.path.join(value, LEGACY_STATE_FILE)):
        raise ValueError(f"--resume_from_checkpoint {value!r}: not a vitacore checkpoint (another tool wrote it); "
                         "give a checkpoint-<step> folder a vitacore run wrote")
    found = latest_checkpoint(value)
    if found is None:
        raise ValueError(f"--resume_from_checkpoint {value!r}: not a complete checkpoint (no {COMPLETE_MARKER}; "
                         "it was interrupted while saving) and it holds none")
    return found


def _publish(tmp: str, final: str) -> None:
    """The commit point: a rename within one folder is atomic (then made durable)."""
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))


@contextlib.contextmanager
def _without_frozen_aliases(module: torch.nn.Module):
    """Drop every name of a frozen parameter from ``module.state_dict()`` while active.

    DeepSpeed's ``exclude_frozen_parameters`` removes the names ``named_parameters()`` lists, which
    skips a tied alias (``lm_head.weight`` tied to the embeddings): the whole frozen matrix would be
    saved under the second name.
    """
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def drop(_module, state, prefix, _metadata):
        if prefix == "":
            for name in frozen & set(state):
                del state[name]

    handle = module.register_state_dict_post_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def _prepare(output_dir: str, final: str, step: int) -> str:
    """Main rank: refuse a foreign folder in the way, drop an unfinished one, create the temporary folder."""
    if os.path.exists(final) and not folders.is_ours(final):
        raise ValueError(f"{final!r} exists and was not written by vitacore (another tool's checkpoint?); it is "
                         "left alone, so this save cannot use its name: move it away or use another --output_dir")
    if os.path.exists(final) and not is_complete(final):
        folders.remove(final)  # vitacore's, without a marker: nothing can resume from it
    return folders.create_tmp_folder(output_dir, step)


def save_checkpoint(engine, output_dir: str, step: int, trainer_state: dict, dist,
                    write_artifacts: Optional[Callable[[str], dict]] = None,
                    write_run_config: Optional[Callable[[str], None]] = None,
                    save_total_limit: Optional[int] = None) -> str:
    """Write ``output_dir/checkpoint-<step>`` atomically; every rank calls this.

    A failure on any rank (a full disk, a foreign folder in the way) stops every rank with its message.

    Args:
        engine: the DeepSpeed engine.
        output_dir: the run's output folder.
        step: the optimizer step just finished.
        trainer_state: JSON-able loop state (data position, identity, ...), the same on every rank.
        dist: this process's place in the job.
        write_artifacts: writes the stage artifacts into a folder (collective; rank 0 writes).
        write_run_config: writes the run's config to a path (``config.yaml``), e.g. ``RunConfig.to_yaml``.
        save_total_limit: keep at most this many complete checkpoints (never deleting the new one).

    Returns:
        The checkpoint's path.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}{step}")
    with ranks.together(f"preparing {tmp}"):
        if dist.is_main:
            _prepare(output_dir, final, step)
    with ranks.together(f"saving the engine state into {tmp}"), _without_frozen_aliases(engine.module):
        engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    with ranks.together(f"writing the state files of {tmp}"):
        artifacts = write_artifacts(tmp) if write_artifacts else {}  # collective (ZeRO-3 gathers)
        save_rng(tmp, dist.rank)
        if dist.is_main:
            write_trainer_state(tmp, {**trainer_state, "step": step, "versions": versions(),
                                      "artifacts": sorted(os.path.basename(p) for p in artifacts.values())})
            if write_run_config is not None:
                write_run_config(os.path.join(tmp, CONFIG_FILE))
    files = describe_files(tmp)  # every rank fsyncs and hashes a share; all ranks' files are written by now
    with ranks.together(f"publishing {final}"):
        if dist.is_main:
            write_complete_marker(tmp, step, files)
            # The same step saved again: the old folder leaves first (set aside, still whole), so a kill
            # before the rename leaves the complete temporary folder, which the next start rolls forward.
            replaced = folders.set_aside(final, folders.DELETING_PREFIX) if os.path.exists(final) else None
            _publish(tmp, final)
            if replaced:
                folders.remove(replaced)
            if save_total_limit:
                rotate(output_dir, save_total_limit, keep=final)
    return final


def _damage_advice(path: str) -> str:
    match = re.search(r"checkpoint-(\d+)$", os.path.normpath(path))
    step = int(match.group(1)) if match else None
    earlier = [p for s, p in list_checkpoints(os.path.dirname(os.path.normpath(path))) if step is not None and s < step]
    if earlier:
        return (f"Resume from an earlier checkpoint with --resume_from_checkpoint {earlier[-1]}, or delete {path} "
                "(a plain restart then resumes from the newest complete checkpoint before it)")
    return (f"Restore {path} from a good copy, resume from another checkpoint with --resume_from_checkpoint "
            f"<path>, or delete it (with no earlier checkpoint the run then starts afresh)")


def verify_checkpoint(path: str, rank: int = 0, world_size: int = 1) -> None:
    """Check a checkpoint's files against its marker: every size, and ``rank``'s share of the hashes.

    Raises:
        ValueError: naming every missing, truncated or altered file, and what to do.
    """
    files = listed_files(path)
    if files is None:
        logger.info(f"note: {path} was written before checkpoints listed their files; its files are not verified")
        return
    problems = find_problems(path, files, rank, world_size)
    if problems:
        raise ValueError(f"checkpoint {path} is damaged: " + "; ".join(problems) + ". " + _damage_advice(path))


def load_checkpoint(engine, path: str, identity: dict, dist, run_config: Optional[Mapping] = None,
                    allowed_changes: frozenset = frozenset()) -> dict:
    """Restore engine, optimizer, scheduler and this rank's RNG from ``path``; every rank calls this.

    The files are verified first (each rank a share); any problem on any rank stops every rank,
    naming the file. DeepSpeed's ``engine.load_checkpoint`` unpickles its own ``state/*.pt`` files in
    full (not in vitacore's hands): only resume from checkpoints you trust.

    Args:
        engine: the DeepSpeed engine to restore into.
        path: the checkpoint folder.
        identity: this run's :func:`run_identity`.
        dist: this process's place in the job.
        run_config: this run's flat resolved config, compared with the checkpoint's ``config.yaml``
            (None: not compared).
        allowed_changes: flags that may differ (``--allow_resume_changes``).

    Returns:
        The saved trainer state.

    Raises:
        CheckpointMismatchError: the checkpoint belongs to another run.
        ValueError / FileNotFoundError: a damaged or unreadable checkpoint, naming the file; a changed
            config the user did not allow, listing the differences.
    """
    notes: list[str] = []
    with ranks.together(f"verifying {path}"):
        verify_checkpoint(path, dist.rank, dist.world_size)
        state = read_trainer_state(path)
        check_identity(state.get("identity", {}), identity, path)
        saved_config = read_saved_config(os.path.join(path, CONFIG_FILE))
        if run_config is not None and saved_config is not None:  # files whole, nothing restored yet
            notes = check_resume_changes(compare_configs(saved_config, run_config, allowed_changes), path)
    with ranks.together(f"loading {path}"):
        try:
            loaded, _ = engine.load_checkpoint(path, tag=DEEPSPEED_TAG, load_module_strict=False,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
        except Exception as err:  # noqa: BLE001 - DeepSpeed's errors rarely name the folder
            raise ValueError(f"checkpoint {path}: DeepSpeed could not read its engine state "
                             f"({os.path.join(path, DEEPSPEED_TAG)}): {err}") from err
        if loaded is None:
            raise ValueError(f"checkpoint {path!r}: DeepSpeed could not read its engine state ({DEEPSPEED_TAG}/)")
        restore_rng(load_rng(path, dist.rank))
    if dist.is_main:
        for note in notes:
            logger.info(f"note: {note}")
    return state
