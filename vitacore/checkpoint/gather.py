"""Read full parameter values, gathering ZeRO-3 partitions where present."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def _is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def gathered_state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """CPU copies of ``module``'s parameters and buffers, keyed ``prefix + name``.

    Under ZeRO-3 this is a collective: every rank must call it (rank 0 then writes).
    """
    params = list(module.parameters())
    context = contextlib.nullcontext()
    if any(_is_partitioned(p) for p in params):
        import deepspeed

        context = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with context:
        state = {f"{prefix}{name}": tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}
    return state
