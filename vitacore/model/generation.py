"""Answer a prompt: media spliced in exactly as training splices them, then the LLM's own ``generate``.

The prompt rows are what the data pipeline collates (``input_ids`` with ``-200`` / ``-500``
placeholders, right-padded, and the media tensors of the batch); the merge
(:func:`vitacore.model.merge.merge_media_embeddings`) re-pads them on the **left**, so every row's
prompt ends at the last position and the LLM continues all rows at once. Position ids follow the
attention mask (0 at each row's first real token), as in training. Prompts are not cut to
``model_max_length`` (training's limit; the data pipeline already refuses records whose text before
the answer reaches it).

Under ZeRO-3 with several ranks every forward gathers parameters collectively, so every rank must
run the same forwards: ``synced=True`` runs the encoders on a dummy input when a batch has no such
media (as training does) and generates exactly ``max_new_tokens`` tokens with no early stop; the
answers are cut at the first stop token afterwards, so they equal an unsynchronized run's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from transformers import GenerationConfig

from vitacore.constants import IGNORE_INDEX
from vitacore.model.merge import merge_media_embeddings

__all__ = ["generate_answers"]


def _stop_ids(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]


def _cut(row: list[int], stops: set[int]) -> list[int]:
    """The row up to and including its first stop token (everything after it is padding or overrun)."""
    for position, token in enumerate(row):
        if token in stops:
            return row[: position + 1]
    return row


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    images: Optional[torch.Tensor] = None,
    audios: Optional[torch.Tensor] = None,
    audio_lengths: Optional[torch.Tensor] = None,
    audio_token_lengths: Optional[torch.Tensor] = None,
    sample_ids: Optional[Sequence[str]] = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    eos_token_id: Optional[int | Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    synced: bool = False,
) -> list[list[int]]:
    """Generate the answer of each prompt row; greedy unless ``temperature`` > 0.

    Args:
        model: a :class:`~vitacore.model.VitaModel` (a plain module, or a DeepSpeed engine's ``module``).
        input_ids: ``(B, L)`` prompt ids up to the assistant turn, media placeholders in place, padded on
            either side (``attention_mask`` says where).
        attention_mask: ``(B, L)``; None: no padding.
        images / audios / audio_lengths / audio_token_lengths: the batch's media, as the collator makes them.
        sample_ids: names used in error messages.
        max_new_tokens: the most tokens generated per row.
        temperature: 0 decodes greedily; above 0 samples at that temperature.
        eos_token_id: the token id(s) that end an answer (the template's end-of-turn and the tokenizer's
            EOS); None: the LLM's generation config's.
        pad_token_id: fills finished rows (None: the first stop id).
        synced: every rank runs the same forwards (ZeRO-3 with several ranks): dummy encoder passes and
            exactly ``max_new_tokens`` steps with no early stop.

    Returns:
        Per row, the new token ids, up to and including the first stop token (if one was generated).

    Raises:
        ValueError: ``max_new_tokens`` < 1, a negative ``temperature``, or placeholders that do not match
            the media (naming the sample).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature {temperature} must be >= 0 (0: greedy)")
    llm = model.llm
    if eos_token_id is None:
        eos_token_id = getattr(getattr(llm, "generation_config", None), "eos_token_id", None)
    stops = _stop_ids(eos_token_id)
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        image_blocks, audio_blocks, _ = model.encode_media(images, audios, audio_lengths, audio_token_lengths, device)
        merged = merge_media_embeddings(
            input_ids, torch.full_like(input_ids, IGNORE_INDEX), attention_mask, llm.get_input_embeddings(),
            image_blocks, audio_blocks, max_length=2**62, padding_side="left", sample_ids=sample_ids)
        # A fresh config: the checkpoint's own defaults (repetition penalty, top-p, ...) would change greedy.
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                  eos_token_id=None if synced else (stops or None), pad_token_id=pad_token_id,
                                  bos_token_id=None, use_cache=True,
                                  **({"temperature": temperature, "top_k": None, "top_p": None}
                                     if temperature > 0 else {}))
        group = torch.distributed.is_available() and torch.distributed.is_initialized()
        output = llm.generate(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask,
                              generation_config=config, synced_gpus=synced and group)
    finally:
        model.train(was_training)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    return [_cut(row, set(stops)) for row in sequences.tolist()]
