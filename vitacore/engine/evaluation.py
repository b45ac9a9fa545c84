"""Evaluation: loss and teacher-forced answer accuracy over a held-out set, summed over ranks."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vitacore.engine.config import LoopConfig
from vitacore.engine.loader import to_device
from vitacore.engine.metrics import answer_accuracy, batch_size


@torch.no_grad()
def evaluate(engine, dataset: Dataset, collate_fn: Callable, loop: LoopConfig, dist, token_model: bool) -> dict:
    """One pass over ``dataset`` (each rank its share) in eval mode; the engine is back in train mode after.

    Args:
        engine: the DeepSpeed engine (or any module taking a collated batch).
        dataset: the held-out samples.
        collate_fn: list of samples -> batch.
        loop: the eval batch size, workers and seed.
        dist: this process's place in the job.
        token_model: the model predicts tokens (accuracy fields are always reported then).

    Returns:
        ``eval_loss`` (weighted by supervised tokens) and ``eval_samples``; with token predictions,
        ``eval_accuracy`` (answer tokens right) and ``eval_exact_match`` (answers with every token right).
    """
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=False)
    loader = DataLoader(dataset, batch_size=loop.per_device_eval_batch_size, sampler=sampler, collate_fn=collate_fn,
                        num_workers=loop.dataloader_num_workers,
                        generator=torch.Generator().manual_seed(loop.seed))  # leaves the global RNG alone
    engine.eval()
    totals = torch.zeros(6, dtype=torch.float64)
    for batch in loader:
        batch.pop("bad_samples", None)  # eval replacements are not counted in the training ratio
        batch = to_device(batch, dist.device)
        output = engine(**batch)
        if "merged_labels" in output and "logits" in output:
            correct, supervised, exact, rows = answer_accuracy(output["logits"], output["merged_labels"])
        else:  # not a token model: a loss weighted by rows, no accuracy
            rows = batch_size(batch)
            correct, supervised, exact = 0, rows, 0
        totals += torch.tensor([float(output["loss"]) * supervised, supervised, correct, exact, rows, 1.0],
                               dtype=torch.float64)
    if dist.world_size > 1:
        totals = totals.to(dist.device)
        torch.distributed.all_reduce(totals)
        totals = totals.cpu()
    engine.train()
    loss_sum, supervised, correct, exact, rows, _ = totals.tolist()
    row = {"eval_loss": loss_sum / max(1.0, supervised), "eval_samples": int(rows)}
    if correct or exact or token_model:
        row.update(eval_accuracy=correct / max(1.0, supervised), eval_exact_match=exact / max(1.0, rows))
    return row
