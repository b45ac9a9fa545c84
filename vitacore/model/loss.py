"""Next-token loss over the LLM's last hidden states, without full-sequence logits.

A causal LM's own loss builds ``[tokens, vocab]`` logits and upcasts them to float32: at 33k tokens
and Qwen2's 151,936-token vocabulary that is 10 GB in bf16 and 20 GB more in float32, before the
backward doubles it. Here the output head and the cross-entropy run together over chunks of the
supervised positions only; each chunk's gradient (with respect to the hidden states and the head's
weight) is computed right away, so no chunk's logits outlive it and backward needs no recompute.

Targets are shifted once, per sample: position ``t`` predicts the token at ``t + 1`` of the same
sample, so in a packed row the last token of one sample never predicts the first of the next.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitacore.constants import IGNORE_INDEX

__all__ = ["LossOutput", "chunked_head", "linear_cross_entropy", "logits_cross_entropy", "next_token_targets"]

# Config fields that post-process logits (soft-capping, scaling): the chunked path would not apply them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass
class LossOutput:
    """The loss and what metrics need from it, without logits.

    Attributes:
        loss: scalar, differentiable: the supervised tokens' summed cross-entropy divided by
            ``num_items_in_batch``, or their mean when it is None.
        token_losses: ``(B, L)`` float32, detached: at ``t`` the loss of predicting the target of ``t``
            (0 where nothing is supervised).
        targets: ``(B, L)`` the shifted targets (IGNORE where nothing is supervised).
        predictions: ``(B, L)`` the argmax token at each supervised position (-1 elsewhere), when asked for.
    """

    loss: torch.Tensor
    token_losses: torch.Tensor
    targets: torch.Tensor
    predictions: Optional[torch.Tensor] = None


def next_token_targets(labels: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, L)`` targets: the label of the next position of the same sample, IGNORE elsewhere.

    Args:
        labels: ``(B, L)`` merged labels.
        segment_ids: ``(B, L)`` sample index per position in packed rows (0 on padding); None: one
            sample per row.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if segment_ids is not None:
        same_sample = segment_ids[:, 1:] == segment_ids[:, :-1]
        targets[:, :-1] = targets[:, :-1].masked_fill(~same_sample, IGNORE_INDEX)
    return targets


def chunked_head(llm: nn.Module) -> Optional[nn.Linear]:
    """The LLM's output head when the chunked loss reproduces its logits exactly, else None.

    That is a plain ``nn.Linear`` head (LoRA or quantized heads, and models that soft-cap or scale
    their logits, keep the LLM's own loss) on a model whose decoder returns the hidden states.
    """
    get_head = getattr(llm, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if type(head) is not nn.Linear:
        return None
    config = getattr(llm, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return None
    get_decoder = getattr(llm, "get_decoder", None)
    if get_decoder is None or get_decoder() is llm:
        return None
    return head


def _gathered(params: list[nn.Parameter]):
    """Under ZeRO-3, the partitioned ``params`` gathered for the block (the head's module never runs)."""
    partitioned = [p for p in params if getattr(p, "ds_id", None) is not None and p.numel() == 0]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, chunk by chunk.

    The gradients are made in the forward, chunk by chunk, and scaled by the incoming gradient in
    the backward; the weight's is accumulated in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, divisor, chunk_size, outputs):
        token_losses, predictions = outputs
        needs_hidden, needs_weight = hidden.requires_grad, weight.requires_grad
        needs_bias = bias is not None and bias.requires_grad
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            x, target = hidden[rows], targets[rows]
            logits = F.linear(x, weight, bias).float()  # one chunk's logits, float32 as the LLM's loss has them
            picked = logits.gather(1, target[:, None]).squeeze(1)
            if predictions is not None:
                predictions[rows] = logits.argmax(dim=-1)
            # The softmax made in the logits' own buffer (torch.logsumexp would allocate a chunk-sized temporary).
            row_max = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(row_max).exp_()
            sums = exps.sum(dim=-1)
            token_losses[rows] = row_max.squeeze(1) + sums.log() - picked
            if not (needs_hidden or needs_weight or needs_bias):
                continue
            # d(loss)/d(logits) = softmax - one_hot, over the divisor.
            grad_logits = exps.div_(sums[:, None])
            grad_logits[torch.arange(x.shape[0], device=x.device), target] -= 1.0
            grad_logits.div_(divisor)
            grad_compute = grad_logits.to(x.dtype)
            if needs_hidden:
                grad_hidden[rows] = grad_compute @ weight
            if needs_weight:
                if x.dtype == torch.float32:
                    grad_weight.addmm_(grad_compute.t(), x)
                else:
                    grad_weight += (grad_compute.t() @ x).float()
            if needs_bias:
                grad_bias += grad_logits.sum(dim=0)
            del logits, exps, grad_logits, grad_compute
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.needs = (needs_hidden, needs_weight, needs_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return token_losses.sum() / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if needed else None for needed in ctx.needs]
        grad_hidden, grad_weight, grad_bias = (None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.dtypes[1])
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                         num_items_in_batch: Optional[torch.Tensor] = None, chunk_size: int = 1024,
                         want_predictions: bool = False) -> LossOutput:
    """The next-token loss of ``head(hidden)`` without building full-sequence logits.

    Only supervised positions go through the head, ``chunk_size`` at a time; under ZeRO-3 the head's
    parameters are gathered for the call (its module never runs).

    Args:
        hidden: ``(B, L, H)`` the LLM's last hidden states (after its final norm).
        head: the output head (:func:`chunked_head`).
        targets: ``(B, L)`` from :func:`next_token_targets`.
        num_items_in_batch: the divisor of the summed loss (None: the number of supervised positions).
        chunk_size: positions per chunk (each chunk builds ``chunk_size x vocab`` float32 logits).
        want_predictions: also return each supervised position's argmax token (evaluation).
    """
    flat_targets = targets.reshape(-1)
    positions = torch.nonzero(flat_targets != IGNORE_INDEX).squeeze(1)
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    num_supervised = positions.numel()
    if num_items_in_batch is not None:
        divisor = num_items_in_batch.to(torch.float32) if torch.is_tensor(num_items_in_batch) else float(
            num_items_in_batch)
    else:
        divisor = float(max(1, num_supervised))
    losses = torch.zeros(num_supervised, dtype=torch.float32, device=hidden.device)
    predictions = torch.zeros(num_supervised, dtype=torch.long, device=hidden.device) if want_predictions else None
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    with _gathered(params):
        loss = _LinearCrossEntropy.apply(selected, head.weight, head.bias, flat_targets.index_select(0, positions),
                                         divisor, chunk_size, (losses, predictions))
    return _scattered(loss, losses, predictions, positions, targets)


def logits_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         num_items_in_batch: Optional[torch.Tensor] = None,
                         want_predictions: bool = False) -> LossOutput:
    """The same loss from full logits (the path for heads :func:`chunked_head` does not take)."""
    flat_targets = targets.reshape(-1)
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    token_losses = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="none")
    supervised = flat_targets != IGNORE_INDEX
    divisor = num_items_in_batch if num_items_in_batch is not None else supervised.sum().clamp(min=1)
    loss = token_losses.sum() / divisor
    positions = torch.nonzero(supervised).squeeze(1)
    with torch.no_grad():
        predictions = flat_logits.index_select(0, positions).argmax(dim=-1) if want_predictions else None
    return _scattered(loss, token_losses.detach().index_select(0, positions), predictions, positions, targets)


def _scattered(loss, losses, predictions, positions, targets) -> LossOutput:
    """Per-position losses (and predictions) laid back out as ``(B, L)``."""
    token_losses = torch.zeros(targets.numel(), dtype=torch.float32, device=losses.device)
    token_losses[positions] = losses.detach()
    laid_out = None
    if predictions is not None:
        laid_out = torch.full((targets.numel(),), -1, dtype=torch.long, device=losses.device)
        laid_out[positions] = predictions
        laid_out = laid_out.view_as(targets)
    return LossOutput(loss, token_losses.view_as(targets), targets, laid_out)
