"""Metrics: the ``metrics.jsonl`` log and teacher-forced answer accuracy."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import torch

from vitacore.constants import IGNORE_INDEX
from vitacore.model.flops import mfu


class MetricsLog:
    """Appends one JSON object per logged step to ``output_dir/metrics.jsonl`` (main rank only).

    A resumed run appends too; readers take the last row per step.
    """

    def __init__(self, output_dir: str, enabled: bool = True):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        self.rows: list[dict] = []

    def reset(self) -> None:
        """Start an empty file (a fresh, not resumed, run)."""
        self.rows = []
        if self.enabled and os.path.exists(self.path):
            os.remove(self.path)

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
    def create(cls, report_to: str, output_dir: str, is_main: bool, notes: list) -> "TensorBoardLog":
        """A writer into ``output_dir/runs`` when ``report_to`` names TensorBoard (a note when it is missing)."""
        wanted = {r.strip() for r in report_to.split(",")} & {"tensorboard", "all"}
        if not wanted or not is_main:
            return cls()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            notes.append("--report_to tensorboard ignored: the tensorboard package is not installed "
                         "(pip install tensorboard)")
            return cls()
        return cls(SummaryWriter(os.path.join(output_dir, "runs")))

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
    values = {round(v, 12) for v in lrs.values()}
    return next(iter(lrs.values())) if len(values) == 1 else dict(lrs)


class MetricsWindow:
    """Sums over the micro-batches since the last logged row."""

    def __init__(self):
        self.loss, self.micro, self.tokens, self.samples, self.started = 0.0, 0, 0, 0, time.time()
        self.steps = 0
        self.flops = 0.0
        self.bad = 0  # samples that stood in for bad ones (--on_bad_sample skip)
        self.global_samples = 0  # samples over all ranks, set by row()
        # True when losses arrive as shares of their step's token-mean (see Trainer._loss_divisor);
        # otherwise they are per-micro-batch means, averaged over micro-batches.
        self.per_step = False

    _SAVED = ("loss", "micro", "tokens", "samples", "steps", "flops", "per_step", "bad")

    def state_dict(self) -> dict:
        """The sums so far (a checkpoint between two logged rows keeps them)."""
        return {name: getattr(self, name) for name in self._SAVED}

    def load_state_dict(self, state: dict) -> None:
        for name in self._SAVED:
            setattr(self, name, state.get(name, 0))  # "bad" is absent from older checkpoints

    def add(self, loss: float, batch: dict, share_of_step: bool) -> None:
        self.per_step = share_of_step
        self.loss += loss
        self.micro += 1
        self.tokens = None if self.tokens is None or "attention_mask" not in batch else (
            self.tokens + int(batch["attention_mask"].sum()))
        self.samples += batch_size(batch)

    def row(self, step: int, epoch: float, lr, grad_norm, dist) -> dict:
        """The metrics row; loss, tokens, samples and bad samples are summed over ranks."""
        elapsed = max(1e-9, time.time() - self.started)
        sums = torch.tensor([self.loss, self.micro, self.tokens or 0, self.samples, self.flops, self.bad],
                            dtype=torch.float64)
        if dist.world_size > 1:
            sums = sums.to(dist.device)
            torch.distributed.all_reduce(sums)
            sums = sums.cpu()
        loss, micro, tokens, samples, flops, bad = sums.tolist()
        self.global_samples = int(samples)
        # Shares are summed over ranks: divide by ranks and by the optimizer steps in the window.
        mean_loss = loss / dist.world_size / max(1, self.steps) if self.per_step else loss / max(1.0, micro)
        return {"step": step, "epoch": epoch, "loss": mean_loss, "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": None if self.tokens is None else tokens / elapsed, "samples_per_s": samples / elapsed,
                "bad_samples": int(bad),
                **self._utilization(flops, elapsed, dist)}

    def _utilization(self, flops: float, elapsed: float, dist) -> dict:
        """``tflops_per_s`` and ``mfu`` on GPUs (encoders counted; see vitacore.model.flops)."""
        if not flops or dist.device.type != "cuda":
            return {}
        steps = max(1, self.steps)
        value = mfu(flops / steps, elapsed / steps, dist.world_size, torch.cuda.get_device_name(dist.device))
        return {"tflops_per_s": flops / elapsed / 1e12, "mfu": value}


def batch_size(batch: dict) -> int:
    """Rows in a batch: ``input_ids``' first dimension, else the first tensor's."""
    tensor = batch.get("input_ids")
    if tensor is None:
        tensor = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    return 0 if tensor is None or tensor.dim() == 0 else tensor.shape[0]
