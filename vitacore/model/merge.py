"""Splice media features into the token embedding sequence, with VITA's semantics.

Each ``-200`` id takes the next image feature block, each ``-500`` the next audio block; feature
positions get IGNORE labels. Rows are truncated to ``max_length`` after expansion without ever
cutting through a media block, then re-padded on the configured side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from vitacore.constants import AUDIO_TOKEN_INDEX, IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass
class MergedInputs:
    """What the LLM receives after the merge."""

    inputs_embeds: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    num_truncated_rows: int = 0


def _row_name(row: int, sample_ids: Optional[Sequence[str]]) -> str:
    return f"sample {sample_ids[row]!r}" if sample_ids is not None else f"batch row {row}"


def merge_media_embeddings(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    image_features: Sequence[torch.Tensor],
    audio_features: Sequence[torch.Tensor],
    max_length: int,
    padding_side: str = "right",
    sample_ids: Optional[Sequence[str]] = None,
) -> MergedInputs:
    """Build ``inputs_embeds`` with media features in place of their placeholder ids.

    Args:
        input_ids: ``(B, L)`` ids with ``-200`` / ``-500`` placeholders.
        labels: ``(B, L)`` labels (IGNORE where unsupervised).
        attention_mask: ``(B, L)``; padding is removed before splicing.
        embed_tokens: the LLM's input embedding module.
        image_features: one ``(tokens, hidden)`` block per ``-200`` id, in row-major order.
        audio_features: one ``(tokens, hidden)`` block per ``-500`` id, in row-major order.
        max_length: longest row after expansion.
        padding_side: ``right`` or ``left``.
        sample_ids: names used in error messages.

    Raises:
        ValueError: placeholder and feature counts differ (the message names the sample).
    """
    num_images = int((input_ids == IMAGE_TOKEN_INDEX).sum())
    num_audios = int((input_ids == AUDIO_TOKEN_INDEX).sum())
    if num_images != len(image_features) or num_audios != len(audio_features):
        per_row = [
            f"{_row_name(r, sample_ids)}: {int((input_ids[r] == IMAGE_TOKEN_INDEX).sum())} image / "
            f"{int((input_ids[r] == AUDIO_TOKEN_INDEX).sum())} audio placeholders"
            for r in range(input_ids.shape[0])
        ]
        raise ValueError(
            f"placeholder/feature mismatch: the batch has {num_images} image and {num_audios} audio "
            f"placeholders but {len(image_features)} image and {len(audio_features)} audio feature "
            f"blocks ({'; '.join(per_row)})"
        )

    text_embeds = embed_tokens(input_ids.clamp(min=0))
    next_image, next_audio = 0, 0
    rows_embeds, rows_labels = [], []
    num_truncated = 0
    for row in range(input_ids.shape[0]):
        keep = attention_mask[row].bool()
        ids, row_labels, row_embeds = input_ids[row][keep], labels[row][keep], text_embeds[row][keep]
        pieces, piece_labels, spans = [], [], []
        start, length = 0, 0
        for pos in torch.nonzero(ids < 0).flatten().tolist():
            if ids[pos] not in (IMAGE_TOKEN_INDEX, AUDIO_TOKEN_INDEX):
                raise ValueError(f"{_row_name(row, sample_ids)}: unexpected negative token id {int(ids[pos])}")
            pieces.append(row_embeds[start:pos])
            piece_labels.append(row_labels[start:pos])
            length += pos - start
            if ids[pos] == IMAGE_TOKEN_INDEX:
                block = image_features[next_image]
                next_image += 1
            else:
                block = audio_features[next_audio]
                next_audio += 1
            block = block.to(row_embeds.dtype)
            pieces.append(block)
            piece_labels.append(torch.full((block.shape[0],), IGNORE_INDEX, dtype=labels.dtype, device=labels.device))
            spans.append((length, length + block.shape[0]))
            length += block.shape[0]
            start = pos + 1
        pieces.append(row_embeds[start:])
        piece_labels.append(row_labels[start:])
        embeds, merged_labels = torch.cat(pieces), torch.cat(piece_labels)
        if embeds.shape[0] > max_length:
            num_truncated += 1
            cut = max_length
            for span_start, span_end in spans:
                if span_start < cut < span_end:
                    cut = span_start
            embeds, merged_labels = embeds[:cut], merged_labels[:cut]
        rows_embeds.append(embeds)
        rows_labels.append(merged_labels)

    return _pad_rows(rows_embeds, rows_labels, padding_side, num_truncated)


def _pad_rows(rows_embeds, rows_labels, padding_side: str, num_truncated: int) -> MergedInputs:
    batch = len(rows_embeds)
    longest = max(r.shape[0] for r in rows_embeds)
    hidden = rows_embeds[0].shape[-1]
    ref = rows_embeds[0]
    embeds = ref.new_zeros((batch, longest, hidden))
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=rows_labels[0].dtype, device=ref.device)
    mask = torch.zeros((batch, longest), dtype=torch.long, device=ref.device)
    positions = torch.zeros((batch, longest), dtype=torch.long, device=ref.device)
    for row, (row_embeds, row_labels) in enumerate(zip(rows_embeds, rows_labels)):
        n = row_embeds.shape[0]
        where = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        embeds[row, where] = row_embeds
        labels[row, where] = row_labels
        mask[row, where] = 1
        positions[row, where] = torch.arange(n, device=ref.device)
    return MergedInputs(embeds, labels, mask, positions, num_truncated)
