"""The optimizer a run builds when its DeepSpeed config has no ``optimizer`` block: ``--optim``."""

from __future__ import annotations

import torch

from vitacore.engine.config import OptimConfig


def _fused_adamw_devices() -> list[str]:
    """Device types torch's fused AdamW kernel runs on (``cpu`` included since torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a private helper: if it moves, assume the devices of torch 2.4+
        return ["cuda", "cpu"]
    return [d for d in _get_fused_kernels_supported_devices() if d]


def build_optimizer(param_groups: list[dict], optim: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """``--optim`` as the HF Trainer reads it: ``torch.optim.AdamW``, with ``fused=True`` for adamw_torch_fused.

    Raises:
        ValueError: adamw_torch_fused on a device without torch's fused AdamW kernel.
    """
    kwargs = {"lr": optim.learning_rate, "betas": (optim.adam_beta1, optim.adam_beta2), "eps": optim.adam_epsilon,
              "weight_decay": optim.weight_decay}
    if optim.optim == "adamw_torch_fused":
        devices = _fused_adamw_devices()
        if device_type not in devices:
            raise ValueError(f"--optim adamw_torch_fused needs a device with torch's fused AdamW kernel "
                             f"({', '.join(devices)}); this run is on {device_type}: use --optim adamw_torch")
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups, **kwargs)
