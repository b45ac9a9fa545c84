"""Metrics: the ``metrics.jsonl`` log and teacher-forced answer accuracy."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional, Sequence

import torch

from vitacore.constants import IGNORE_INDEX
from vitacore.engine.trackers import TensorBoardLog  # noqa: F401  (moved; importable here as before)
from vitacore.model.flops import mfu


class MetricsLog:
    """Appends one JSON object per logged step to ``output_dir/metrics.jsonl`` (main rank only).

    A resumed run appends too; readers take the last row per step (:mod:`vitacore.engine.curves`).
    """

    def __init__(self, output_dir: str, enabled: bool = True):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        self.rows: list[dict] = []

    def reset(self) -> Optional[str]:
        """Start an empty log (a fresh, not resumed, run): an earlier run's file is moved aside, never deleted.

        Returns:
            where the earlier file went (``metrics.<its last write time>.jsonl`` beside it), or None.
        """
        self.rows = []
        if not self.enabled or not os.path.exists(self.path):
            return None
        folder = os.path.dirname(self.path)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(self.path)))
        aside, copy = os.path.join(folder, f"metrics.{stamp}.jsonl"), 1
        while os.path.exists(aside):
            aside, copy = os.path.join(folder, f"metrics.{stamp}-{copy}.jsonl"), copy + 1
        os.replace(self.path, aside)
        return aside

    def write(self, row: dict) -> None:
        """Append ``row``; a NaN or infinite number is written as the string ``"nan"``, ``"inf"`` or ``"-inf"``
        (JSON has no such numbers, and ``null`` would hide what happened)."""
        self.rows.append(dict(row))
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(_json_safe(row)) + "\n")
            fh.flush()


def _json_safe(value):
    """``value`` with every non-finite float (also inside dicts and lists) as its string."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _per_sample(values: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B, L)`` -> one row per sample: a packed row's samples each become a row (others unchanged).

    Every sample keeps its positions in place and the rest of its row filled with 0, so sums and
    ``all`` over a row are over that sample alone.
    """
    if segment_ids is None:
        return values
    rows = []
    for row in range(values.shape[0]):
        for segment in segment_ids[row].unique().tolist():
            if segment:
                rows.append(values[row] * (segment_ids[row] == segment).to(values.dtype))
    return torch.stack(rows) if rows else values[:0]


@torch.no_grad()
def answer_accuracy(predictions: torch.Tensor, targets: torch.Tensor,
                    segment_ids: Optional[torch.Tensor] = None) -> tuple[int, int, int, int]:
    """Teacher-forced argmax accuracy on supervised tokens.

    Args:
        predictions: ``(B, L)`` the model's argmax at each supervised position.
        targets: ``(B, L)`` next-token targets (IGNORE where unsupervised).
        segment_ids: packed rows' sample numbers (None: one sample per row).

    Returns:
        ``(correct tokens, supervised tokens, fully correct samples, samples with supervision)``.
    """
    supervised = targets != IGNORE_INDEX
    hits = (predictions == targets) & supervised
    sample_supervised = _per_sample(supervised.long(), segment_ids).bool()
    sample_misses = _per_sample((supervised & ~hits).long(), segment_ids).bool()
    rows = sample_supervised.any(dim=1)
    exact = ~sample_misses.any(dim=1) & rows
    return int(hits.sum()), int(supervised.sum()), int(exact.sum()), int(rows.sum())


def format_lr(lrs: dict[str, float]) -> Optional[float | dict]:
    """One number when every group has the same LR, else ``{group: lr}``."""
    values = {round(v, 12) for v in lrs.values()}
    return next(iter(lrs.values())) if len(values) == 1 else dict(lrs)


# The modalities the per-modality losses are named after (a record counts as the first it has).
MODALITIES = ("image", "video", "audio", "text")


@torch.no_grad()
def sample_token_losses(token_losses: torch.Tensor, targets: torch.Tensor,
                        segment_ids: Optional[torch.Tensor] = None) -> tuple[list[float], list[int]]:
    """Per sample (per row, or per sample of a packed row): its summed next-token cross-entropy over
    its supervised positions, and their count (the model's ``token_losses`` and ``targets``)."""
    supervised = (targets != IGNORE_INDEX).to(token_losses.dtype)
    sums = _per_sample(token_losses * supervised, segment_ids).sum(dim=1)
    counts = _per_sample(supervised, segment_ids).sum(dim=1)
    return [float(v) for v in sums.tolist()], [int(v) for v in counts.tolist()]


def _peak_memory_gb(device: torch.device) -> float:
    """CUDA's peak allocated memory on a GPU, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


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
        # Token-loss sums and supervised-token counts per metric key ("all", "image", "dataset/x", ...).
        self.groups: dict[str, list[float]] = {}
        self.data_wait = 0.0  # seconds spent waiting for batches

    _SAVED = ("loss", "micro", "tokens", "samples", "steps", "flops", "per_step", "bad", "groups", "data_wait")

    def state_dict(self) -> dict:
        """The sums so far (a checkpoint between two logged rows keeps them)."""
        return {name: getattr(self, name) for name in self._SAVED}

    def load_state_dict(self, state: dict) -> None:
        for name in self._SAVED:
            setattr(self, name, state.get(name, 0))  # "bad" is absent from older checkpoints
        self.groups = {key: list(value) for key, value in (state.get("groups") or {}).items()}

    def add_breakdown(self, loss_sums: list[float], counts: list[int], modalities: list[str],
                      datasets: list[str]) -> None:
        """Add each row's token-loss sum and supervised tokens to its modality and dataset (and "all")."""
        for loss, count, modality, dataset in zip(loss_sums, counts, modalities, datasets):
            for key in ("all", modality, f"dataset/{dataset}" if dataset else None):
                if key is not None:
                    total = self.groups.setdefault(key, [0.0, 0])
                    total[0] += loss
                    total[1] += count

    def add(self, loss: float, batch: dict, share_of_step: bool) -> None:
        self.per_step = share_of_step
        self.loss += loss
        self.micro += 1
        self.tokens = None if self.tokens is None or "attention_mask" not in batch else (
            self.tokens + int(batch["attention_mask"].sum()))
        # A packed batch holds several samples per row: count samples (the bad-sample ratio divides by them).
        self.samples += len(batch["sample_ids"]) if "segment_ids" in batch else batch_size(batch)

    def row(self, step: int, epoch: float, lr, grad_norm, dist, datasets: Sequence[str] = ()) -> dict:
        """The metrics row; loss, tokens, samples and bad samples are summed over ranks.

        With per-row token losses (:meth:`add_breakdown`), ``loss`` is the token-weighted mean over
        the window's supervised tokens on every rank, and ``loss_<modality>`` / ``loss/<dataset>``
        the same over each one's tokens (None when the window had none), with their token counts
        ``answer_tokens_<modality>``: the counts weigh the parts back to ``loss``. ``datasets``:
        every dataset name the data has (the same on all ranks, so the sums line up).
        """
        elapsed = max(1e-9, time.time() - self.started)
        keys = ["all", *MODALITIES, *(f"dataset/{name}" for name in datasets)]
        breakdown = [value for key in keys for value in self.groups.get(key, (0.0, 0))]
        sums = torch.tensor([self.loss, self.micro, self.tokens or 0, self.samples, self.flops, self.bad,
                             self.data_wait, *breakdown], dtype=torch.float64)
        peak = torch.tensor([_peak_memory_gb(dist.device)], dtype=torch.float64)
        if dist.world_size > 1:
            sums, peak = sums.to(dist.device), peak.to(dist.device)
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
            sums, peak = sums.cpu(), peak.cpu()
        loss, micro, tokens, samples, flops, bad, data_wait, *breakdown = sums.tolist()
        self.global_samples = int(samples)
        parts = {key: (breakdown[2 * i], breakdown[2 * i + 1]) for i, key in enumerate(keys)}
        if parts["all"][1] > 0:
            mean_loss = parts["all"][0] / parts["all"][1]
        else:  # shares are summed over ranks: divide by ranks and by the optimizer steps in the window
            mean_loss = loss / dist.world_size / max(1, self.steps) if self.per_step else loss / max(1.0, micro)
        row = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": lr,
               "grad_norm": None if grad_norm is None else float(grad_norm),
               "tokens_per_s": None if self.tokens is None else tokens / elapsed, "samples_per_s": samples / elapsed,
               "bad_samples": int(bad), "peak_memory_gb": float(peak[0]),
               "data_wait_share": data_wait / dist.world_size / elapsed,
               **self._utilization(flops, elapsed, dist)}
        if parts["all"][1] > 0:
            for modality in MODALITIES:
                total, count = parts[modality]
                row[f"loss_{modality}"] = total / count if count else None
                row[f"answer_tokens_{modality}"] = int(count)
            for name in datasets:
                total, count = parts[f"dataset/{name}"]
                row[f"loss/{name}"] = total / count if count else None
        return row

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
