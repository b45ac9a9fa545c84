"""Whether a checkpoint belongs to this run: what must match to resume it (model, trainable set, world
size, batch layout, seed)."""

from __future__ import annotations

import os
from typing import Optional

import torch


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another run (model, trainable set or world size differ)."""


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
        if _source(saved.get(field)) != _source(current.get(field)):  # also checkpoints of older versions
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


def _source(value: Optional[str]) -> Optional[str]:
    """A model source as one spelling: a local folder by its real path (``./llm`` == ``/abs/llm``)."""
    if isinstance(value, str) and value and os.path.exists(value):
        return os.path.realpath(value)
    return value


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
            "llm": _source(getattr(model.config, "_name_or_path", None) if hasattr(model, "config") else None),
            "vision_tower": _source(mm.get("mm_vision_tower")), "audio_encoder": _source(mm.get("mm_audio_encoder")),
            "mm_projector_type": mm.get("mm_projector_type"), "trainable": trainable,
            "batch": list(batch_layout), "seed": seed}
