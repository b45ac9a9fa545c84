"""Optimizer parameter groups: decay / no-decay over the trainable parameters."""

from __future__ import annotations

import torch.nn as nn

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Embedding)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay: biases, norm weights (incl. RMSNorm) and
    embeddings."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if is_norm or param_name == "bias":
                names.add(full)
    return names


def build_param_groups(model: nn.Module, learning_rate: float, weight_decay: float) -> list[dict]:
    """Split the trainable parameters into a decay and a no-decay group.

    Each group carries ``name`` and ``param_names`` so logs and reports can say what it holds.

    Raises:
        ValueError: nothing is trainable.
    """
    skip_decay = no_decay_names(model)
    decay, no_decay = ([], []), ([], [])
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        bucket = no_decay if name in skip_decay else decay
        bucket[0].append(name)
        bucket[1].append(param)
    if not decay[0] and not no_decay[0]:
        raise ValueError("no trainable parameters: the freeze policy froze everything; check --stage and the tune_*/freeze_* flags")
    groups = []
    for label, (names, params), wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
        if params:
            groups.append({"name": label, "params": params, "param_names": names, "lr": learning_rate, "weight_decay": wd})
    return groups
