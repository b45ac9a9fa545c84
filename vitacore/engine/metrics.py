"""Metrics: the ``metrics.jsonl`` log and teacher-forced answer accuracy."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch

from vitacore.constants import IGNORE_INDEX


class MetricsLog:
    """Appends one JSON object per logged step to ``output_dir/metrics.jsonl`` (main rank only).

    A resumed run appends too; readers take the last row per step.
    """

    def __init__(self, output_dir: str, enabled: bool = True):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.rows.append(clean)
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
            fh.flush()


class TensorBoardLog:
    """Scalars of every metrics row to TensorBoard (``--report_to tensorboard``), main rank only."""

    def __init__(self, writer=None):
        self.writer = writer

    @classmethod
    def create(cls, training, is_main: bool, notes: list) -> "TensorBoardLog":
        wanted = {r.strip() for r in training.report_to.split(",")} & {"tensorboard", "all"}
        if not wanted or not is_main:
            return cls()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            notes.append("--report_to tensorboard ignored: the tensorboard package is not installed "
                         "(pip install tensorboard)")
            return cls()
        return cls(SummaryWriter(os.path.join(training.output_dir, "runs")))

    def write(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key == "lr" and isinstance(value, dict):
                for group, lr in value.items():
                    self.writer.add_scalar(f"lr/{group}", lr, row["step"])
            elif isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int, int]:
    """Teacher-forced argmax accuracy on supervised tokens.

    Returns:
        ``(correct tokens, supervised tokens, fully correct rows, rows with supervision)``.
    """
    predictions = logits[:, :-1].argmax(dim=-1)
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    hits = (predictions == targets) & supervised
    rows = supervised.any(dim=1)
    exact = ((hits | ~supervised).all(dim=1) & rows)
    return int(hits.sum()), int(supervised.sum()), int(exact.sum()), int(rows.sum())


def format_lr(lrs: dict[str, float]) -> Optional[float | dict]:
    """One number when every group has the same LR, else ``{group: lr}``."""
    values = set(round(v, 12) for v in lrs.values())
    return next(iter(lrs.values())) if len(values) == 1 else dict(lrs)
