"""Learning-rate schedules as torch ``LambdaLR`` multipliers (per-group LRs survive them)."""

from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """``--warmup_steps`` wins over ``--warmup_ratio`` (as in the HF Trainer)."""
    return warmup_steps if warmup_steps > 0 else int(math.ceil(warmup_ratio * total_steps))


def lr_multiplier(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The factor applied to every group's base LR at optimizer step ``s`` (0-based).

    Raises:
        ValueError: unknown schedule name.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"--lr_scheduler_type {schedule!r} is not one of: {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant_with_warmup":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
