"""Dummy encoder passes that keep ranks in step when a micro-batch lacks a modality.

Under ZeRO-3 every module's parameters are gathered collectively when it runs, and trainable
encoder parameters need a gradient on every rank; so with several ranks an encoder whose media a
micro-batch lacks still runs once, on a dummy input, and its zero-weighted output joins the loss.

A dummy pass costs no more than those two needs require:

- **Fewest tokens.** Every module runs, in the same order as on real media (so the ranks' gathers
  match), but the token sequence is cut where it enters the transformer blocks, to the fewest tokens
  the encoder's output allows (an encoder's ``fewest_token_cuts``): one patch, four under InternViT's
  2×2 pixel shuffle, plus the CLS token where there is one; one Whisper state. Only the patch
  embedding (Whisper: its first convolution) sees the full-size input, which the position embeddings
  need. The cut lies before every block, so a block recomputed in backward (InternViT checkpoints its
  layers) sees the same tokens again.
- **Nothing to gather, nothing to train.** An encoder whose parameters are not ZeRO-3-partitioned
  and all frozen does not run at all: no rank gathers it, and no gradient of it is reduced. That is
  every frozen encoder below ZeRO-3, and under ZeRO-3 too by default: the engine holds frozen
  encoders and adapters out of partitioning, whole on every rank (:mod:`vitacore.model.zero3_view`,
  ``--zero3_frozen_parts``). A trainable projector (adapter, audio prompt) after it still runs,
  alone, on one token of zeros, so its gradient is reduced on every rank.
- **Always, under ZeRO-3.** A partitioned encoder (a trainable one, or any with
  ``--zero3_frozen_parts partitioned``) runs on every micro-batch, even when no rank has
  its media. A trainable one must: its gradient must exist, as zeros, on every micro-batch, because
  ZeRO-3 copies the first micro-batch's gradient of an accumulation window into a buffer it never
  clears, so a parameter without a gradient in a window is stepped with an older window's gradient.
  A frozen one could be skipped when the ranks agree none has its media, but the module order would
  then depend on the data, and ZeRO-3's prefetch follows a recorded order (tried with
  ``bench/text_only_step.py``, whose steps then alternated orders: DeepSpeed's parameter gathers in
  backward grew from about 10 to 170 ms per step, against about 20 ms the skipped pass saved).
- **No state changes.** BatchNorm layers run in eval mode during a dummy pass: a batch of zeros must
  not move their running statistics (VITA's adapters weigh each new batch 0.99). SyncBatchNorm is
  left as it is: in training mode it takes part in a collective of its own.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn

from vitacore.partition import is_partitioned

# Feature frames of the dummy clip for encoders without ``fewest_frames``: the shortest clip the tiny
# encoder's subsampling convolutions accept comfortably (VITA's encoder takes it as well).
DUMMY_AUDIO_FRAMES = 16


def dummy_image_output(model, device) -> Optional[torch.Tensor]:
    """With ``model.run_all_encoders``: the summed output of the cheapest vision pass that keeps ranks in step.

    Tower and projector on one blank image, cut to the tower's fewest tokens; the projector alone when
    the tower needs neither a gather nor a gradient; None when nothing needs either (or the switch is off).
    """
    if not model.run_all_encoders or model.vision_tower is None or model.mm_projector is None:
        return None
    tower, projector = model.vision_tower, model.mm_projector
    if _must_run(tower):
        size = tower.image_spec.image_size
        with _fewest_tokens(tower), _batch_norms_in_eval(tower, projector):
            return _total(model.encode_images(torch.zeros(1, 3, size, size, device=device)))
    if _must_run(projector):
        with _batch_norms_in_eval(projector):
            return projector(torch.zeros(1, 1, tower.hidden_size, device=device, dtype=_dtype(projector))).sum()
    return None


def dummy_audio_output(model, device) -> Optional[torch.Tensor]:
    """With ``model.run_all_encoders``: the summed output of the cheapest audio pass that keeps ranks in step.

    Encoder, adapter (and audio prompt) on one silent clip, cut to the encoder's fewest states; the
    adapter and prompt alone when the encoder needs neither a gather nor a gradient; None when nothing
    needs either (or the switch is off).
    """
    if not model.run_all_encoders or model.audio_encoder is None or model.audio_adapter is None:
        return None
    encoder, adapter, prompt = model.audio_encoder, model.audio_adapter, model.audio_prompt
    if _must_run(encoder):
        frames = getattr(encoder, "fewest_frames", DUMMY_AUDIO_FRAMES)
        mel = encoder.num_mel_bins  # the encoder's own input width (80 fbank bins, Whisper's mels)
        with _fewest_tokens(encoder), _batch_norms_in_eval(encoder, adapter):
            return _total(model.encode_audio(torch.zeros(1, frames, mel, device=device),
                                             torch.tensor([frames], device=device), torch.tensor([1], device=device)))
    after = [module for module in (adapter, prompt) if module is not None]
    if not any(_must_run(module) for module in after):
        return None
    with _batch_norms_in_eval(adapter):
        total = adapter(torch.zeros(1, 1, encoder.hidden_size, device=device, dtype=_dtype(adapter))).sum()
    return total if prompt is None else total + prompt.weight.sum()


def _trains(module: nn.Module) -> bool:
    """Whether this forward computes gradients for some parameter of ``module``."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


def _must_run(module: nn.Module) -> bool:
    """Whether every rank must run ``module``: ZeRO-3 gathers its parameters collectively, or it trains."""
    return any(is_partitioned(p) for p in module.parameters()) or _trains(module)


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _total(blocks: Iterable[torch.Tensor]) -> torch.Tensor:
    return sum(block.sum() for block in blocks)


@contextlib.contextmanager
def _fewest_tokens(encoder: nn.Module) -> Iterator[None]:
    """While open, each ``(module, dim, length)`` of ``encoder.fewest_token_cuts()`` has its output cut to its
    first ``length`` entries along ``dim`` (nothing for an encoder without cuts: its dummy input is short)."""
    cuts = encoder.fewest_token_cuts() if hasattr(encoder, "fewest_token_cuts") else []

    def cutter(dim: int, length: int):
        return lambda module, inputs, output: output.narrow(dim, 0, length)

    handles = [module.register_forward_hook(cutter(dim, length)) for module, dim, length in cuts]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _batch_norms_in_eval(*modules: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``modules`` that are training (SyncBatchNorm aside) switch to eval mode while open."""
    norms = [m for module in modules for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm) and m.training]
    for norm in norms:
        norm.eval()
    try:
        yield
    finally:
        for norm in norms:
            norm.train()
