"""Read full parameter values, gathering ZeRO-3 partitions where present."""

from __future__ import annotations

import torch
import torch.nn as nn

from vitacore.partition import gathered


def gathered_state(module: nn.Module, prefix: str = "", parameters_only: bool = False) -> dict[str, torch.Tensor]:
    """CPU copies of ``module``'s parameters and buffers (only parameters with ``parameters_only``),
    keyed ``prefix + name``.

    Under ZeRO-3 this is a collective: every rank must call it (rank 0 then writes).
    """
    with gathered(module.parameters()):
        tensors = dict(module.named_parameters()) if parameters_only else module.state_dict()
        state = {f"{prefix}{name}": tensor.detach().cpu().clone() for name, tensor in tensors.items()}
    return state
