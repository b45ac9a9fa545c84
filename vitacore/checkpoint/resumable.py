"""Resumable checkpoints: ``output_dir/checkpoint-<step>/``, written atomically, found, checked, rotated.

A checkpoint folder holds:

- ``state/`` + ``latest``: DeepSpeed's engine state of the trainable parameters only, with optimizer
  and scheduler (``zero_to_fp32.py`` beside them when ZeRO wrote partitioned optimizer state);
- ``rng_state_<rank>.pth``: each rank's python / numpy / torch / CUDA generator states;
- ``vitacore_state.json``: step, epoch, data position, the run's identity (what must match to resume)
  and library versions (vitacore's own schema, so not named like the HF Trainer's ``trainer_state.json``;
  checkpoints written before the rename are still read under that old name); ``config.yaml``: the resolved run config;
- the stage artifacts of that moment (``mm_projector.bin``, ...);
- ``checkpoint_complete.json``, written last.

Everything is written into ``tmp-checkpoint-<step>/`` and renamed when complete, so a kill at any
moment leaves either the finished folder or a temporary one that is never resumed from.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
from typing import Callable, Optional

import numpy as np
import torch

from vitacore._version import __version__
from vitacore.checkpoint.artifacts import atomic_torch_save

COMPLETE_MARKER = "checkpoint_complete.json"
STATE_FILE = "vitacore_state.json"
LEGACY_STATE_FILE = "trainer_state.json"  # what checkpoints of vitacore 0.x before the rename hold
CONFIG_FILE = "config.yaml"
DEEPSPEED_TAG = "state"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = "tmp-checkpoint-"
_DELETING_PREFIX = "deleting-checkpoint-"


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another run (model, trainable set or world size differ)."""


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.exists(os.path.join(path, COMPLETE_MARKER)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint in ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume_flag: Optional[str], output_dir: str) -> Optional[str]:
    """The checkpoint to resume from, following ``--resume_from_checkpoint``.

    - unset: the newest complete checkpoint in ``output_dir`` if there is one, else a fresh start;
    - ``True``: the newest one, and an error when there is none;
    - ``False``: a fresh start, refused when ``output_dir`` already holds checkpoints;
    - a path: that checkpoint (a ``checkpoint-<step>`` folder, or an output folder: its newest).

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
    if os.path.exists(os.path.join(value, COMPLETE_MARKER)):
        return value
    found = latest_checkpoint(value)
    if found is None:
        raise ValueError(f"--resume_from_checkpoint {value!r}: not a complete checkpoint (no {COMPLETE_MARKER}; "
                         "it was interrupted while saving) and it holds none")
    return found


def check_identity(saved: dict, current: dict, path: str) -> None:
    """Refuse to resume when the checkpoint was written by a different run.

    Raises:
        CheckpointMismatchError: listing every field that differs.
    """
    problems = []
    if saved.get("world_size") != current.get("world_size"):
        problems.append(f"it was written by {saved.get('world_size')} process(es) and this run has "
                        f"{current.get('world_size')} (partitioned optimizer state cannot be re-split here; "
                        f"resume with --nproc_per_node {saved.get('world_size')})")
    for field in ("llm", "vision_tower", "audio_encoder", "mm_projector_type"):
        if saved.get(field) != current.get(field):
            problems.append(f"{field} is {saved.get(field)!r} there but {current.get(field)!r} here")
    if saved.get("batch") != current.get("batch"):
        problems.append(f"--per_device_train_batch_size, --gradient_accumulation_steps were {saved.get('batch')} "
                        f"there and are {current.get('batch')} here (the saved data position counts in them)")
    if saved.get("seed") != current.get("seed"):
        problems.append(f"--seed was {saved.get('seed')} there and is {current.get('seed')} here "
                        "(the data order follows it)")
    saved_params, params = saved.get("trainable", {}), current.get("trainable", {})
    only_saved = sorted(set(saved_params) - set(params))
    only_here = sorted(set(params) - set(saved_params))
    reshaped = sorted(n for n in set(saved_params) & set(params) if saved_params[n] != params[n])
    if only_saved:
        problems.append(f"it trains {len(only_saved)} parameter(s) this run freezes, e.g. {only_saved[:3]}")
    if only_here:
        problems.append(f"this run trains {len(only_here)} parameter(s) it did not, e.g. {only_here[:3]}")
    if reshaped:
        name = reshaped[0]
        problems.append(f"{len(reshaped)} parameter(s) changed shape, e.g. {name} {saved_params[name]} -> "
                        f"{params[name]}")
    if problems:
        raise CheckpointMismatchError(f"checkpoint {path!r} is from a different run: " + "; ".join(problems)
                                      + ". Use another --output_dir, or --resume_from_checkpoint False there")


def run_identity(model: torch.nn.Module, world_size: int, batch_layout: list[int], seed: int) -> dict:
    """What a checkpoint must share with a run to be resumed by it (see :func:`check_identity`).

    Args:
        model: the model being trained (its trainable set and, for a ``VitaModel``, its sources).
        world_size: processes in the job (partitioned state cannot be re-split).
        batch_layout: ``[micro-batch, accumulation steps]``; the data position counts in these units.
        seed: the data order follows it.
    """
    mm = getattr(model, "mm_config", {}) or {}
    trainable = {name: list(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters() if p.requires_grad}
    return {"world_size": world_size,
            "llm": getattr(model.config, "_name_or_path", None) if hasattr(model, "config") else None,
            "vision_tower": mm.get("mm_vision_tower"), "audio_encoder": mm.get("mm_audio_encoder"),
            "mm_projector_type": mm.get("mm_projector_type"), "trainable": trainable,
            "batch": list(batch_layout), "seed": seed}


def _versions() -> dict:
    import deepspeed  # imported by the engine already; kept out of this module's import for light tools
    import transformers

    return {"vitacore": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}


def _rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _barrier(dist) -> None:
    if dist.world_size > 1:
        torch.distributed.barrier()


def _publish(tmp: str, final: str) -> None:
    """The commit point: a rename within one folder is atomic."""
    os.replace(tmp, final)


def _remove(path: str) -> None:
    """Delete a checkpoint so that no half-deleted folder ever looks complete."""
    parent, name = os.path.split(path)
    doomed = os.path.join(parent, _DELETING_PREFIX + name.split("-")[-1] + f"-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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


def save_checkpoint(engine, output_dir: str, step: int, trainer_state: dict, dist,
                    write_artifacts: Optional[Callable[[str], dict]] = None,
                    write_run_config: Optional[Callable[[str], None]] = None,
                    save_total_limit: Optional[int] = None) -> str:
    """Write ``output_dir/checkpoint-<step>`` atomically; every rank calls this.

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
    tmp = os.path.join(output_dir, f"{_TMP_PREFIX}{step}")
    if dist.is_main:
        for leftover in (tmp, final):  # an interrupted save of this step, or a folder without marker
            if os.path.exists(leftover) and not os.path.exists(os.path.join(leftover, COMPLETE_MARKER)):
                shutil.rmtree(leftover)
        os.makedirs(tmp)
    _barrier(dist)
    with _without_frozen_aliases(engine.module):
        engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    atomic_torch_save(_rng_states(), os.path.join(tmp, f"rng_state_{dist.rank}.pth"))
    artifacts = write_artifacts(tmp) if write_artifacts else {}
    if dist.is_main:
        state = {**trainer_state, "step": step, "versions": _versions(),
                 "artifacts": sorted(os.path.basename(p) for p in artifacts.values())}
        with open(os.path.join(tmp, STATE_FILE), "w") as fh:
            json.dump(state, fh, indent=1)
        if write_run_config is not None:
            write_run_config(os.path.join(tmp, CONFIG_FILE))
    _barrier(dist)  # every rank's files are on disk before the marker says so
    if dist.is_main:
        with open(os.path.join(tmp, COMPLETE_MARKER), "w") as fh:
            json.dump({"step": step, "time": time.time()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.exists(final):
            _remove(final)
        _publish(tmp, final)
        if save_total_limit:
            rotate(output_dir, save_total_limit)
    _barrier(dist)
    return final


def rotate(output_dir: str, limit: int) -> list[str]:
    """Delete the oldest complete checkpoints beyond ``limit`` (the newest is always kept).

    Returns:
        The deleted paths.
    """
    found = list_checkpoints(output_dir)
    doomed = [path for _, path in found[:max(0, len(found) - max(1, limit))]]
    for path in doomed:
        _remove(path)
    return doomed


def clean_partial_saves(output_dir: str) -> list[str]:
    """Remove temporary folders left by saves that were killed (main rank, before training)."""
    removed = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith((_TMP_PREFIX, _DELETING_PREFIX)):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
                removed.append(name)
    return removed


def read_trainer_state(path: str) -> dict:
    """The ``vitacore_state.json`` of a checkpoint folder (``trainer_state.json`` in older ones)."""
    name = STATE_FILE if os.path.exists(os.path.join(path, STATE_FILE)) else LEGACY_STATE_FILE
    with open(os.path.join(path, name)) as fh:
        return json.load(fh)


def load_checkpoint(engine, path: str, identity: dict, dist) -> dict:
    """Restore engine, optimizer, scheduler and this rank's RNG from ``path``; every rank calls this.

    Returns:
        The saved trainer state.

    Raises:
        CheckpointMismatchError: the checkpoint belongs to another run.
    """
    state = read_trainer_state(path)
    check_identity(state.get("identity", {}), identity, path)
    loaded, _ = engine.load_checkpoint(path, tag=DEEPSPEED_TAG, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise ValueError(f"checkpoint {path!r}: DeepSpeed could not read its engine state ({DEEPSPEED_TAG}/)")
    rng_file = os.path.join(path, f"rng_state_{dist.rank}.pth")
    _restore_rng(torch.load(rng_file, weights_only=False))
    return state
