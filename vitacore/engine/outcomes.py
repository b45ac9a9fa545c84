"""What the Trainer reports: a run's result, one step's outcome, and the errors that stop a run on numerics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite more often than ``--skip_nonfinite_steps`` allows."""


class NonFiniteGradientError(NonFiniteLossError):
    """The global gradient norm was NaN or infinite (with a finite loss) more often than allowed, or an
    engine without an overflow check applied such a step."""


@dataclass
class TrainResult:
    """What a finished run reports."""

    num_steps: int
    seconds: float
    first_loss: Optional[float]
    last_loss: Optional[float]
    final_eval: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    stopped_by: Optional[str] = None
    num_skipped_steps: int = 0  # micro-batches (non-finite loss) and optimizer steps (non-finite gradients)


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step reports to the loop."""

    grad_norm: Optional[float]  # pre-clip global norm; inf / nan for a skipped step, None when nothing stepped
    stop_requested: bool
