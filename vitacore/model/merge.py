"""Splice media features into the token embedding sequence, with VITA's semantics.

Each ``-200`` id takes the next image feature block, each ``-500`` the next audio block; feature
positions get IGNORE labels. Rows (or, packed, each sample) are truncated to ``max_length`` after expansion without ever
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
    segment_ids: Optional[torch.Tensor] = None  # packed rows: 1..k per sample, 0 on padding


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
    segment_ids: Optional[torch.Tensor] = None,
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
        sample_ids: names used in error messages (per row; per sample in packed rows).
        segment_ids: ``(B, L)`` packed rows: the sample (1..k) each id belongs to, 0 on padding; each
            sample is expanded, truncated to ``max_length`` and numbered from position 0 on its own.

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
    blocks = _BlockQueue(image_features, audio_features)
    rows = []
    num_truncated = 0
    for row in range(input_ids.shape[0]):
        keep = attention_mask[row].bool()
        ids, row_labels, row_embeds = input_ids[row][keep], labels[row][keep], text_embeds[row][keep]
        if segment_ids is None:
            bounds = [(0, ids.shape[0])]
        else:  # packed: each sample is expanded and truncated on its own
            row_segments = segment_ids[row][keep]
            starts = [0] + (torch.nonzero(row_segments[1:] != row_segments[:-1]).flatten() + 1).tolist()
            bounds = list(zip(starts, starts[1:] + [ids.shape[0]]))
        pieces = []
        for start, end in bounds:
            embeds, merged_labels, truncated = _expand(ids[start:end], row_labels[start:end], row_embeds[start:end],
                                                       blocks, max_length, row, sample_ids)
            num_truncated += truncated
            pieces.append((embeds, merged_labels))
        rows.append(pieces)
    return _pad_rows(rows, padding_side, num_truncated, packed=segment_ids is not None)


class _BlockQueue:
    """Media feature blocks handed out in placeholder order."""

    def __init__(self, image_features, audio_features):
        self.images, self.audios = iter(image_features), iter(audio_features)

    def take(self, token_id: int) -> torch.Tensor:
        return next(self.images) if token_id == IMAGE_TOKEN_INDEX else next(self.audios)


def _expand(ids, labels, embeds, blocks: _BlockQueue, max_length: int, row: int,
            sample_ids) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One sample's embeddings and labels with its media spliced in, cut to ``max_length`` (never
    through a media block); and whether it was cut."""
    pieces, piece_labels, spans = [], [], []
    start, length = 0, 0
    for pos in torch.nonzero(ids < 0).flatten().tolist():
        if ids[pos] not in (IMAGE_TOKEN_INDEX, AUDIO_TOKEN_INDEX):
            raise ValueError(f"{_row_name(row, sample_ids)}: unexpected negative token id {int(ids[pos])}")
        pieces.append(embeds[start:pos])
        piece_labels.append(labels[start:pos])
        length += pos - start
        block = blocks.take(int(ids[pos])).to(embeds.dtype)
        pieces.append(block)
        piece_labels.append(torch.full((block.shape[0],), IGNORE_INDEX, dtype=labels.dtype, device=labels.device))
        spans.append((length, length + block.shape[0]))
        length += block.shape[0]
        start = pos + 1
    pieces.append(embeds[start:])
    piece_labels.append(labels[start:])
    merged, merged_labels = torch.cat(pieces), torch.cat(piece_labels)
    if merged.shape[0] <= max_length:
        return merged, merged_labels, False
    cut = max_length
    for span_start, span_end in spans:
        if span_start < cut < span_end:
            cut = span_start
    return merged[:cut], merged_labels[:cut], True


def _pad_rows(rows, padding_side: str, num_truncated: int, packed: bool) -> MergedInputs:
    """Rows of ``(embeds, labels)`` samples -> padded tensors; positions restart at each sample."""
    lengths = [sum(embeds.shape[0] for embeds, _ in pieces) for pieces in rows]
    batch, longest = len(rows), max(lengths)
    ref, ref_labels = rows[0][0]
    embeds = ref.new_zeros((batch, longest, ref.shape[-1]))
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=ref_labels.dtype, device=ref.device)
    mask = torch.zeros((batch, longest), dtype=torch.long, device=ref.device)
    positions = torch.zeros((batch, longest), dtype=torch.long, device=ref.device)
    segments = torch.zeros((batch, longest), dtype=torch.long, device=ref.device)
    for row, (pieces, n) in enumerate(zip(rows, lengths)):
        offset = longest - n if padding_side == "left" else 0
        for number, (piece_embeds, piece_labels) in enumerate(pieces, start=1):
            where = slice(offset, offset + piece_embeds.shape[0])
            embeds[row, where] = piece_embeds
            labels[row, where] = piece_labels
            mask[row, where] = 1
            positions[row, where] = torch.arange(piece_embeds.shape[0], device=ref.device)
            segments[row, where] = number
            offset += piece_embeds.shape[0]
    return MergedInputs(embeds, labels, mask, positions, num_truncated, segments if packed else None)
