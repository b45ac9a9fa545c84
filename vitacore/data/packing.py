"""Packing: several samples per row, planned from each epoch's global order and dealt to the ranks.

An epoch's packs are fixed by arithmetic on the per-record lengths (no sample is read to plan them):

1. The epoch's global order of sample indices, the same on every rank: the seeded shuffle
   :class:`~vitacore.data.sampler.ResumableSampler` gives over all ranks, or VITA's modality- and
   length-grouped order (:func:`grouped_order`).
2. :func:`plan_packs` cuts that order into runs of consecutive indices whose lengths add up to at
   most ``packing_max_length`` (next-fit: the order, and so the grouping, is kept).
3. The packs are padded with the epoch's first packs to a multiple of the ranks and dealt out,
   pack ``i`` to rank ``i % num_replicas``, so every rank has as many packs, hence micro-batches.

:class:`PackSampler` hands out this rank's packs; the DataLoader reads them through
:class:`~vitacore.data.packed_batch.PackedDataset` (one pack per loader item, its samples read in the
worker) and batches them with :class:`~vitacore.data.packed_batch.PackedCollator`. As the epoch's
order differs from epoch to epoch, so may its number of packs: :meth:`PackSampler.num_samples_in_epoch`
gives each epoch's count (the same on every rank).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence

from torch.utils.data import Sampler

from vitacore.data.grouped_sampler import ModalityLengthGroupedSampler
from vitacore.data.sampler import ResumableSampler

__all__ = ["PackSampler", "grouped_order", "pack_lengths", "plan_packs", "shuffled_order"]

EpochOrder = Callable[[int], Sequence[int]]


def pack_lengths(modality_lengths: Sequence[int], model_max_length: Optional[int]) -> list[int]:
    """Each record's room in a pack: its model-input tokens (media expanded), at most ``model_max_length``.

    The model truncates every sample alone to ``model_max_length``, so a longer record takes only
    that much of its row. ``modality_lengths`` are signed (negative: text-only); None: no cap.
    """
    cap = model_max_length if model_max_length is not None else math.inf
    return [max(1, int(min(abs(int(length)), cap))) for length in modality_lengths]


def plan_packs(order: Sequence[int], lengths: Sequence[int], max_length: int) -> list[tuple[int, ...]]:
    """Cut ``order`` into packs of consecutive indices whose ``lengths`` sum to at most ``max_length``.

    Greedy (next-fit): a pack takes the following index while it fits, else the next pack starts
    with it. Order is kept, so packs follow the order's modality grouping; a record longer than
    ``max_length`` gets a pack alone.

    Args:
        order: sample indices, in the epoch's order.
        lengths: per sample index, its tokens in a pack (see :func:`pack_lengths`).
        max_length: the most tokens of a pack.

    Returns:
        The packs, each a tuple of sample indices, in order.
    """
    if max_length < 1:
        raise ValueError(f"packing_max_length {max_length} must be >= 1")
    packs: list[tuple[int, ...]] = []
    current: list[int] = []
    used = 0
    for index in order:
        length = lengths[index]
        if current and used + length > max_length:
            packs.append(tuple(current))
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        packs.append(tuple(current))
    return packs


def shuffled_order(num_samples: int, seed: int) -> EpochOrder:
    """Epoch -> the seeded shuffle of ``range(num_samples)`` that ``ResumableSampler`` deals out over all ranks."""
    whole = ResumableSampler(range(num_samples), num_replicas=1, rank=0, seed=seed)

    def order(epoch: int) -> list[int]:
        whole.set_epoch(epoch)
        return list(whole)

    return order


def grouped_order(modality_lengths: Sequence[int], seed: int, samples_per_step: int, accumulation: int) -> EpochOrder:
    """Epoch -> VITA's modality- and length-grouped order (``--group_by_modality_length``) over all ranks.

    The grouped sampler's order for one rank whose optimizer step takes ``samples_per_step``
    samples: single-modality megabatches of that many samples, shuffled, each cut into
    ``accumulation`` chunks of similar total length. Packing keeps that order, so a step's packs
    share a modality as far as the data allows.

    Args:
        modality_lengths: signed token lengths (positive with media, negative text-only).
        seed: shuffle seed; epoch ``e`` uses ``seed + e``.
        samples_per_step: samples in a megabatch (about the samples one optimizer step packs, all ranks).
        accumulation: gradient accumulation steps.
    """
    per_chunk = max(1, samples_per_step // accumulation)
    grouped = ModalityLengthGroupedSampler(modality_lengths, per_chunk, num_replicas=1, rank=0, seed=seed,
                                           accumulation=accumulation)
    return grouped.epoch_order


class PackSampler(Sampler[tuple]):
    """This rank's packs of each epoch (see the module docstring), resumable to the exact pack.

    The loader's items are packs, so :attr:`num_samples_per_epoch` and :meth:`skip` count packs
    exactly as :class:`~vitacore.data.sampler.ResumableSampler`'s count samples: a resumed run
    skips the packs its checkpoint consumed by index arithmetic, reading none of them.

    Args:
        lengths: per sample index, its tokens in a pack (:func:`pack_lengths`).
        max_length: the most tokens of a pack (``--packing_max_length``).
        num_replicas: ranks in the job.
        rank: this rank.
        epoch_order: epoch -> the global order of sample indices (:func:`shuffled_order`,
            :func:`grouped_order`); it must give the same order on every rank.
    """

    def __init__(self, lengths: Sequence[int], max_length: int, num_replicas: int, rank: int,
                 epoch_order: EpochOrder):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        if max_length < 1:
            raise ValueError(f"packing_max_length {max_length} must be >= 1")
        if not lengths:
            raise ValueError("packing: the dataset has no samples")
        self.lengths = list(lengths)
        self.max_length, self.num_replicas, self.rank = max_length, num_replicas, rank
        self.epoch_order = epoch_order
        self.epoch = 0
        self._num_skipped = 0
        self._counts: dict[int, int] = {}  # epoch -> packs per rank (cheap to keep; plans are not)
        self._plan: Optional[tuple[int, list[tuple[int, ...]]]] = None  # (epoch, this rank's packs)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s packs (call before every pass)."""
        self.epoch = epoch

    def skip(self, num_packs: int) -> None:
        """Leave out the first ``num_packs`` of this rank's next pass."""
        if not 0 <= num_packs <= self.num_samples_per_epoch:
            raise ValueError(f"cannot skip {num_packs} packs of an epoch of {self.num_samples_per_epoch} on this rank")
        self._num_skipped = num_packs

    @property
    def num_samples_per_epoch(self) -> int:
        """This rank's packs in the current epoch (the loader's items are packs)."""
        return self.num_samples_in_epoch(self.epoch)

    def num_samples_in_epoch(self, epoch: int) -> int:
        """This rank's packs in ``epoch``, the same count on every rank."""
        if epoch not in self._counts:
            self._counts[epoch] = len(self.rank_packs(epoch))
        return self._counts[epoch]

    def global_packs(self, epoch: int) -> list[tuple[int, ...]]:
        """Every rank's packs of ``epoch`` in dealing order, padded to a multiple of the ranks."""
        packs = plan_packs(self.epoch_order(epoch), self.lengths, self.max_length)
        padding = (-len(packs)) % self.num_replicas
        if padding:  # as DistributedSampler pads: the epoch's first packs again
            packs += (packs * math.ceil(padding / len(packs)))[:padding]
        return packs

    def rank_packs(self, epoch: int) -> list[tuple[int, ...]]:
        """This rank's packs of ``epoch``: every ``num_replicas``-th pack from ``rank`` on."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self.global_packs(epoch)[self.rank::self.num_replicas])
        return self._plan[1]

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        start, self._num_skipped = self._num_skipped, 0
        return iter(self.rank_packs(self.epoch)[start:])

    def __len__(self) -> int:
        return self.num_samples_per_epoch - self._num_skipped
