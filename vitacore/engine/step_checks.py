"""Checks the ranks agree on: the same run at start, finite losses and gradients, finite weights at a save.

Every function that takes ``dist`` is collective when ``dist.world_size > 1``: all ranks call it at
the same point, so one rank's finding stops (or skips) every rank at once instead of leaving its
peers waiting in the next collective.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Optional

import torch

from vitacore import ranks


def agree_any(flags: list[bool], dist) -> list[bool]:
    """Each flag OR-ed over the ranks, in one collective (the flags themselves in one process)."""
    if dist.world_size == 1:
        return [bool(f) for f in flags]
    reduced = torch.tensor([1.0 if f else 0.0 for f in flags], device=dist.device)
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in reduced.tolist()]


# ---- the same run on every rank -------------------------------------------------------------------

def _digest(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _as_dict(config) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def _data_identity(dataset) -> dict:
    identity = {"records": len(dataset)}
    fingerprint = getattr(dataset, "fingerprint", None)
    if callable(fingerprint):
        fingerprint = fingerprint()
    if fingerprint is not None:
        identity["fingerprint"] = str(fingerprint)
    return identity


def check_same_run(dist, train_dataset, configs: dict) -> None:
    """Stop every rank, naming what differs, unless all ranks see the same data and the same configs.

    Ranks that read different data files (a path that differs per node, a file changed while the
    job started) or got different flags would otherwise train on mismatched shards, or hang in a
    collective one of them never reaches.

    Args:
        dist: the process's place in the job.
        train_dataset: the training set: its length, and its ``fingerprint`` where it has one.
        configs: ``{what: config}`` (dataclasses or dicts), e.g. ``{"loop config": loop}``.

    Raises:
        ValueError: on every rank, naming the data or the config (and its fields) that differ.
    """
    if dist.world_size == 1:
        return
    resolved = {what: _as_dict(config) for what, config in configs.items()}
    mine = {"training data": _data_identity(train_dataset), **{what: _digest(c) for what, c in resolved.items()}}
    everyone = ranks.gather_all(mine)
    differing = [what for what in mine if any(other[what] != everyone[0][what] for other in everyone)]
    if not differing:
        return
    # Every rank gathered the same list, so every rank takes this branch: the second gather is safe.
    full = ranks.gather_all({what: resolved[what] for what in differing if what in resolved})
    problems = []
    for what in differing:
        if what == "training data":
            seen = "; ".join(f"rank {r}: {_describe_data(other[what])}" for r, other in enumerate(everyone))
            problems.append(f"the ranks see different training data ({seen}); give every rank the same "
                            "--data_path / --dataset_use files with the same contents")
        else:
            fields = sorted({key for other in full for key in set(other[what]) | set(full[0][what])
                             if other[what].get(key) != full[0][what].get(key)})
            values = "; ".join(f"{key}: " + ", ".join(f"rank {r} {other[what].get(key)!r}" for r, other in
                                                       enumerate(full)) for key in fields[:5])
            problems.append(f"the ranks resolved a different {what} ({values}); launch every rank with the "
                            "same flags and config files")
    raise ValueError("the ranks of this job do not agree on the run: " + " | ".join(problems))


def _describe_data(identity: dict) -> str:
    text = f"{identity['records']} records"
    return f"{text}, fingerprint {identity['fingerprint']}" if "fingerprint" in identity else text


# ---- gradients and weights ------------------------------------------------------------------------

def local_grad_norm(param_groups: list[dict]) -> float:
    """The L2 norm of the ``.grad`` of the groups' parameters (0.0 when none has one)."""
    grads = [p.grad.detach() for group in param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def step_unless_nonfinite(engine, param_groups: list[dict], dist) -> tuple[Optional[float], Optional[bool]]:
    """The optimizer step at an accumulation boundary, skipped when the global gradient norm is not finite.

    A skipped step leaves weights and optimizer state as they were, drops the gradients and does
    not advance the LR schedule. DeepSpeed's ZeRO-1/2/3 and bf16 optimizers check the norm
    themselves, over all ranks, and skip (``was_step_applied()`` is then False, the norm ``inf``); a
    plain torch optimizer (ZeRO-0, fp32) gets no check from DeepSpeed, so its gradients are checked
    here, before it steps. Either way the ranks agree on the outcome.

    Returns:
        ``(pre-clip global gradient norm, skipped)``; ``skipped`` is None for an fp16 loss-scale
        overflow (routine: DeepSpeed lowers the scale), which is not a fault.
    """
    if not hasattr(engine.optimizer, "overflow"):  # a torch optimizer
        norm = local_grad_norm(param_groups)  # ZeRO-0: already reduced over ranks in the boundary backward
        skipped = agree_any([not math.isfinite(norm)], dist)[0]
        if skipped:
            engine.optimizer.zero_grad(set_to_none=True)
        else:
            engine.step()
        return norm, skipped
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = None if norm is None else float(norm)
    skipped = agree_any([not engine.was_step_applied()], dist)[0]
    return norm, (None if skipped and engine.fp16_enabled() else skipped)


def is_finite(value: Optional[float]) -> bool:
    """Whether a reported norm is a finite number (None, from an engine that did not compute one, counts)."""
    return value is None or math.isfinite(value)


def first_nonfinite_weight(model: torch.nn.Module) -> Optional[str]:
    """The name of the first trainable parameter holding a NaN or infinity in this rank's copy, else None.

    Under ZeRO-3 a rank holds only its partition (``ds_tensor``); checked on every rank, the
    partitions cover the whole parameter.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            local = getattr(param, "ds_tensor", None)
            local = param if local is None else local
            if local.numel() and not bool(torch.isfinite(local).all()):
                return name
    return None
