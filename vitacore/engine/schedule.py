"""Learning-rate schedules by transformers' ``get_scheduler`` names, as the HF Trainer builds them.

The schedule is transformers' own (``get_scheduler(name, optimizer, num_warmup_steps,
num_training_steps, scheduler_specific_kwargs)``), so a run's per-step learning rate equals the HF
Trainer's for the same flags. Its ``LambdaLR`` multiplies every param group's own base LR by the same
factor, so per-unit learning rates keep their ratios.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
             "cosine_with_min_lr", "warmup_stable_decay")


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """``--warmup_steps`` wins over ``--warmup_ratio`` (as in the HF Trainer)."""
    return warmup_steps if warmup_steps > 0 else int(math.ceil(warmup_ratio * total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int,
                    kwargs: Optional[dict] = None) -> torch.optim.lr_scheduler.LRScheduler:
    """The ``--lr_scheduler_type`` schedule over ``total_steps`` optimizer steps.

    Args:
        optimizer: the optimizer whose groups' LRs it scales.
        schedule: a name of :data:`SCHEDULES`.
        warmup_steps: steps of warm-up (ignored by ``constant``).
        total_steps: optimizer steps of the run.
        kwargs: ``--lr_scheduler_kwargs`` (e.g. ``num_cycles``, ``power``, ``min_lr_rate``, ``num_decay_steps``).

    Raises:
        ValueError: an unknown schedule, or arguments the schedule does not take or lacks.
    """
    from transformers import get_scheduler

    if schedule not in SCHEDULES:
        raise ValueError(f"--lr_scheduler_type {schedule!r} is not one of: {', '.join(SCHEDULES)}")
    try:
        return get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                             scheduler_specific_kwargs=dict(kwargs or {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"--lr_scheduler_type {schedule} with --lr_scheduler_kwargs {kwargs or {}}: {err} (see "
                         "transformers' get_scheduler for the arguments each schedule takes)") from None


def rebase_schedule(scheduler, base_lrs: list[float]) -> None:
    """After a resume: the run's own base LRs at the restored step (the checkpoint brought its own).

    Loading a checkpoint restores the schedule's step and the base LRs it was built with; the
    schedule's shape (its lambdas) is this run's. A run allowed to change ``--learning_rate`` (or a
    unit's LR) on resume gets the new rates from the restored step on; otherwise the rates are equal.

    Args:
        scheduler: the engine's ``LambdaLR`` (others are left alone).
        base_lrs: the run's base LR per optimizer param group, in the optimizer's order.
    """
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or len(base_lrs) != len(scheduler.base_lrs):
        return
    scheduler.base_lrs = [float(lr) for lr in base_lrs]
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
