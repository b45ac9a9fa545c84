"""Evaluation: loss and teacher-forced answer accuracy over a held-out set, summed over ranks; with
``--eval_generate``, also the answers generated from each sample's prompt (exact match, token F1)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from vitacore.console import logger
from vitacore.engine.config import LoopConfig
from vitacore.engine.loader import to_device
from vitacore.engine.metrics import answer_accuracy, batch_size
from vitacore.engine.signals import StopRequest, worker_signal_options

STOPPED = {"eval_stopped": True}  # what an evaluation that a stop request cut short returns


@torch.no_grad()
def evaluate(engine, dataset: Dataset, collate_fn: Callable, loop: LoopConfig, dist, token_model: bool,
             generation: Optional[GenerationEval] = None, stop: Optional[StopRequest] = None) -> dict:
    """One pass over ``dataset`` (each rank its share) in eval mode; the engine is back in train mode after.

    Args:
        engine: the DeepSpeed engine (or any module taking a collated batch).
        dataset: the held-out samples.
        collate_fn: list of samples -> batch.
        loop: the eval batch size, workers and seed.
        dist: this process's place in the job.
        token_model: the model predicts tokens (accuracy fields are always reported then).
        generation: with ``loop.eval_generate``, the prompts to answer (:func:`evaluate_generation`).
        stop: the run's stop request: the ranks agree on it before every batch and all stop together
            at the first batch after a SIGTERM / SIGINT (None: evaluate to the end).

    Returns:
        ``eval_loss`` (weighted by supervised tokens) and ``eval_samples``; with token predictions,
        ``eval_accuracy`` (answer tokens right) and ``eval_exact_match`` (answers with every token right);
        with generation, ``eval_generate_exact_match`` and ``eval_generate_f1``. Stopped by a signal:
        only ``{"eval_stopped": True}`` (a partial pass is not comparable with whole ones).
    """
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=False)
    loader = DataLoader(dataset, batch_size=loop.per_device_eval_batch_size, sampler=sampler, collate_fn=collate_fn,
                        num_workers=loop.dataloader_num_workers, **worker_signal_options(),
                        generator=torch.Generator().manual_seed(loop.seed))  # leaves the global RNG alone
    if dist.is_main:
        logger.info(f"evaluation started: {len(dataset)} samples, {loop.per_device_eval_batch_size} per batch "
                    f"and process")
    engine.eval()
    try:
        return _evaluate_batches(engine, loader, loop, dist, token_model, generation, stop)
    finally:
        engine.train()


def _evaluate_batches(engine, loader: DataLoader, loop: LoopConfig, dist, token_model: bool,
                      generation: Optional[GenerationEval], stop: Optional[StopRequest]) -> dict:
    totals = torch.zeros(6, dtype=torch.float64)
    for batch in loader:
        # Every rank has as many batches (the sampler pads), so the agreement lines up; stopping
        # before a forward also keeps ZeRO-3's gathers in step.
        if stop is not None and stop.agree(dist):
            return dict(STOPPED)
        batch.pop("bad_samples", None)  # eval replacements are not counted in the training ratio
        batch = to_device(batch, dist.device)
        output = engine(**batch)
        if "predictions" in output:
            correct, supervised, exact, rows = answer_accuracy(output["predictions"], output["targets"],
                                                               output.get("segment_ids"))
        else:  # not a token model: a loss weighted by rows, no accuracy
            rows = batch_size(batch)
            correct, supervised, exact = 0, rows, 0
        totals += torch.tensor([float(output["loss"]) * supervised, supervised, correct, exact, rows, 1.0],
                               dtype=torch.float64)
    if dist.world_size > 1:
        totals = totals.to(dist.device)
        torch.distributed.all_reduce(totals)
        totals = totals.cpu()
    generated = evaluate_generation(engine, generation, loop, dist, stop) if loop.eval_generate and generation else {}
    if generated.get("eval_stopped"):
        return generated
    loss_sum, supervised, correct, exact, rows, _ = totals.tolist()
    row = {"eval_loss": loss_sum / max(1.0, supervised), "eval_samples": int(rows)}
    if correct or exact or token_model:
        row.update(eval_accuracy=correct / max(1.0, supervised), eval_exact_match=exact / max(1.0, rows))
    return {**row, **generated}


@dataclass(frozen=True)
class GenerationEval:
    """What generation-based evaluation needs from the data side.

    Attributes:
        dataset: prompt-only samples, one per eval sample.
        collate_fn: samples -> a batch of the model's ``generate`` inputs plus ``references`` (answer texts).
        decode: generated token ids -> the answer's text (end of turn and state token removed).
        max_new_tokens: tokens generated per answer (the same on every rank).
        eos_token_id: the ids that end an answer.
        pad_token_id: fills finished rows.
    """

    dataset: Dataset
    collate_fn: Callable
    decode: Callable[[Sequence[int]], str]
    max_new_tokens: int = 64
    eos_token_id: Optional[list[int]] = None
    pad_token_id: Optional[int] = None


def normalize_answer(text: str) -> str:
    """Whitespace collapsed to single spaces, ends stripped."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answers are equal after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 over whitespace-split words: the harmonic mean of precision and recall of the
    words in common (counted with multiplicity); 1.0 when both answers are empty."""
    predicted, expected = prediction.split(), reference.split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def evaluate_generation(engine, generation: GenerationEval, loop: LoopConfig, dist,
                        stop: Optional[StopRequest] = None) -> dict:
    """Generate (greedily) the answer of every prompt and score it against its reference, summed over ranks.

    Each rank takes every ``world_size``-th prompt from its rank on; the shorter shares are padded with
    repeats that are generated but not counted, so every rank runs the same number of ``generate``
    calls. With several ranks every call generates exactly ``max_new_tokens`` tokens (no early stop),
    so under ZeRO-3 every rank runs the same forwards.

    Returns:
        ``eval_generate_exact_match`` and ``eval_generate_f1`` (means over the prompts); ``{"eval_stopped":
        True}`` when ``stop`` (agreed before every batch, as in :func:`evaluate`) was asked for.
    """
    model = getattr(engine, "module", engine)
    total = len(generation.dataset)
    mine = list(range(dist.rank, total, dist.world_size))
    share = math.ceil(total / dist.world_size)
    padded = mine + [mine[0] if mine else 0] * (share - len(mine))
    loader = DataLoader(Subset(generation.dataset, padded), batch_size=loop.per_device_eval_batch_size,
                        shuffle=False, collate_fn=generation.collate_fn, num_workers=loop.dataloader_num_workers,
                        **worker_signal_options())
    totals = torch.zeros(3, dtype=torch.float64)
    position = 0
    for batch in loader:
        if stop is not None and stop.agree(dist):  # every rank has as many batches (padded shares)
            return dict(STOPPED)
        references = batch.pop("references")
        batch.pop("bad_samples", None)
        batch = to_device(batch, dist.device)
        answers = model.generate(**batch, max_new_tokens=generation.max_new_tokens,
                                 eos_token_id=generation.eos_token_id, pad_token_id=generation.pad_token_id,
                                 synced=dist.world_size > 1)
        for ids, reference in zip(answers, references):
            if position < len(mine):
                text = generation.decode(ids)
                totals += torch.tensor([exact_match(text, reference), token_f1(text, reference), 1.0],
                                       dtype=torch.float64)
            position += 1
    if dist.world_size > 1:
        totals = totals.to(dist.device)
        torch.distributed.all_reduce(totals)
        totals = totals.cpu()
    exact, f1, count = totals.tolist()
    return {"eval_generate_exact_match": exact / max(1.0, count), "eval_generate_f1": f1 / max(1.0, count)}
