"""A pack as a loader item, and packs as a packed micro-batch.

:class:`PackedDataset` maps a pack (a tuple of sample indices, from
:class:`~vitacore.data.packing.PackSampler`) to its samples, so DataLoader workers build samples in
parallel as they do unpacked. :class:`PackedCollator` lays each pack's samples end to end in one row
and marks which sample each token belongs to:

- ``input_ids`` / ``labels`` / ``attention_mask`` ``[R, L]``: the row collator's (pad id, -100, 0 on padding);
- ``segment_ids`` ``[R, L]`` long: ``k`` on the tokens of the row's ``k``-th sample (from 1), 0 on padding;
- ``images`` / ``audios`` (and their lengths) in row-major sample order, as the row collator gives them;
- ``sample_ids`` / ``sample_modalities`` / ``sample_datasets``: one entry per sample, row-major;
- ``bad_samples``: the samples that stand in for bad records, as the row collator marks them.

The model resets positions per segment, lets each attend only to itself, and never supervises a
segment's first token from the previous sample's last one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from vitacore.data.dataset import Sample

__all__ = ["PackedCollator", "PackedDataset", "join_pack"]


class PackedDataset(Dataset):
    """A dataset whose items are packs: ``dataset[pack]`` is the list of the pack's samples.

    Args:
        dataset: the samples' dataset (bad-sample handling and all stay its own).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, pack: Sequence[int]) -> list[Sample]:
        return [self.dataset[index] for index in pack]


def join_pack(samples: Sequence[Sample]) -> Sample:
    """One row's sample: the samples' tokens, labels and media end to end, in order.

    The joined sample carries no ``replaced_from``: :class:`PackedCollator` marks every bad sample itself.
    """
    first = samples[0]
    return replace(first, sample_id="+".join(s.sample_id for s in samples),
                   input_ids=[t for s in samples for t in s.input_ids], labels=[t for s in samples for t in s.labels],
                   images=[image for s in samples for image in s.images],
                   audios=[audio for s in samples for audio in s.audios],
                   audio_token_lengths=[n for s in samples for n in s.audio_token_lengths], replaced_from=None)


class PackedCollator:
    """Packs (lists of :class:`Sample`) -> a packed micro-batch (see the module docstring).

    Args:
        collate_rows: the unpacked collator (:class:`~vitacore.data.dataset.Collator`): it pads the
            joined rows and stacks their media; this class adds the segments and per-sample fields.
    """

    def __init__(self, collate_rows: Callable[[list[Sample]], dict]):
        self.collate_rows = collate_rows

    def __call__(self, packs: Sequence[Sequence[Sample]]) -> dict:
        batch = self.collate_rows([join_pack(pack) for pack in packs])
        segment_ids = torch.zeros_like(batch["input_ids"])
        for row, pack in enumerate(packs):
            start = 0
            for segment, sample in enumerate(pack, start=1):
                end = start + len(sample.input_ids)
                segment_ids[row, start:end] = segment
                start = end
        samples = [sample for pack in packs for sample in pack]
        batch.update(segment_ids=segment_ids, sample_ids=[s.sample_id for s in samples],
                     sample_modalities=[s.media for s in samples], sample_datasets=[s.dataset for s in samples])
        replaced = [s.replaced_from for s in samples if s.replaced_from is not None]
        if replaced:
            batch["bad_samples"] = replaced
        return batch
