"""VITA's modality- and length-grouped sampler, split across ranks and resumable to the exact sample."""

from __future__ import annotations

import heapq
import math
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler


def _split_balanced(megabatch: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Cut a single-modality megabatch into ``num_chunks`` equal-sized chunks of similar total length.

    Longest first, each index goes to the chunk with the least total length that still has room
    (ties: the lowest chunk), as LLaVA does, so every rank gets about the same number of tokens.
    Each chunk comes out sorted longest first.
    """
    size = len(megabatch) // num_chunks
    order = sorted(megabatch, key=lambda i: -abs(lengths[i]))  # stable: ties keep the shuffled order
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    heap = [(0, chunk) for chunk in range(num_chunks)]
    for index in order:
        total, chunk = heapq.heappop(heap)
        chunks[chunk].append(index)
        if len(chunks[chunk]) < size:  # a full chunk leaves the heap (LLaVA sets its total to inf)
            heapq.heappush(heap, (total + abs(lengths[index]), chunk))
    return chunks


def _split_by_modality(megabatch: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Cut a mixed megabatch into consecutive chunks: multimodal samples, then text-only ones.

    Each modality is sorted longest first; only the chunk on the boundary holds both modalities.
    """
    size = len(megabatch) // num_chunks
    multimodal = sorted((i for i in megabatch if lengths[i] > 0), key=lambda i: -lengths[i])
    text = sorted((i for i in megabatch if lengths[i] < 0), key=lambda i: lengths[i])
    order = multimodal + text
    return [order[c * size:(c + 1) * size] for c in range(num_chunks)]


class ModalityLengthGroupedSampler(Sampler[int]):
    """This rank's share of VITA's ``group_by_modality_length`` order, seeded per epoch.

    ``lengths[i]`` is sample ``i``'s length in tokens (media tokens counted), positive for a sample
    with media and negative for a text-only one (LLaVA's sign convention); zero is an error.

    An epoch's order, the same on every rank (all randomness comes from ``seed + epoch``):

    1. The multimodal and the text-only indices are shuffled separately and cut into megabatches of
       ``num_replicas x batch_size x accumulation`` samples (one optimizer step over all ranks), so
       no full megabatch mixes modalities. Data of a single modality is one group.
    2. The full megabatches are shuffled together. The partial last megabatch of each modality is
       merged into a tail that comes last (as VITA/LLaVA do; LLaVA also moves the last megabatch
       when it is full, we keep it in the shuffle). The tail is ordered by modality, then length,
       so at most one micro-batch of each tail megabatch mixes modalities.
    3. If the dataset size ``n`` is not a multiple of ``num_replicas``, the tail is padded with the
       epoch's first ``(-n) % num_replicas`` indices repeated (as ``DistributedSampler`` pads), so
       every rank has ``ceil(n / num_replicas)`` samples and the same number of micro-batches.
    4. Each megabatch is sorted by length, longest first, and cut into ``num_replicas x
       accumulation`` micro-batches balanced in total tokens (a mixed one: consecutively, see
       step 2); micro-batch ``c`` goes to rank ``c % num_replicas`` (the order HF/accelerate give
       LLaVA's flat list). The last, smaller megabatch gives each rank one equal share.

    Unlike VITA, the per-modality shuffles are seeded too (LLaVA passes ``generator=None`` there),
    and the sort uses ``abs(length)``, so text-only data sorts longest first as well.

    Args:
        lengths: signed token lengths, one per sample of the dataset.
        batch_size: per-device micro-batch size.
        num_replicas: ranks in the job.
        rank: this rank.
        seed: shuffle seed; epoch ``e`` uses ``seed + e``.
        accumulation: gradient accumulation steps (micro-batches per optimizer step).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int, rank: int, seed: int,
                 accumulation: int = 1):
        if batch_size < 1 or accumulation < 1 or num_replicas < 1:
            raise ValueError(f"batch_size ({batch_size}), accumulation ({accumulation}) and num_replicas "
                             f"({num_replicas}) must be positive")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.lengths = [int(length) for length in lengths]
        zero = next((i for i, length in enumerate(self.lengths) if length == 0), None)
        if zero is not None:
            raise ValueError(f"sample {zero} has modality length 0; lengths must be positive (with media) "
                             "or negative (text-only)")
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.accumulation, self.seed = accumulation, seed
        self.epoch = 0
        self._num_skipped = 0  # left out of the next pass
        self._position = 0  # index into this epoch's order of the next sample handed out
        self._cache: Optional[tuple[int, int, list[int]]] = None  # (seed, epoch, order)

    @property
    def megabatch_size(self) -> int:
        """Samples in one optimizer step over all ranks."""
        return self.num_replicas * self.batch_size * self.accumulation

    @property
    def num_samples_per_epoch(self) -> int:
        """This rank's samples in a whole epoch (``ceil(n / num_replicas)``)."""
        return math.ceil(len(self.lengths) / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order (call before every pass)."""
        self.epoch = epoch
        self._position = self._num_skipped

    def skip(self, num_samples: int) -> None:
        """Leave out the first ``num_samples`` of this rank's next pass."""
        if not 0 <= num_samples <= self.num_samples_per_epoch:
            raise ValueError(f"cannot skip {num_samples} samples of an epoch of {self.num_samples_per_epoch} "
                             "on this rank")
        self._num_skipped = self._position = num_samples

    def state_dict(self) -> dict:
        """The position: epoch, samples of it this rank has handed out, and what fixes the order.

        ``num_consumed`` counts indices given to the caller. A ``DataLoader`` draws indices ahead of
        the batches it returns (more so with workers), so a training loop should save the batches it
        actually consumed (as :class:`vitacore.engine.Trainer` does) and restore with :meth:`skip`.
        """
        return {"epoch": self.epoch, "num_consumed": self._position, "seed": self.seed,
                "num_replicas": self.num_replicas, "batch_size": self.batch_size,
                "accumulation": self.accumulation, "num_samples": len(self.lengths)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`: the next pass yields exactly the indices not yet consumed."""
        mine = {"num_replicas": self.num_replicas, "batch_size": self.batch_size,
                "accumulation": self.accumulation, "num_samples": len(self.lengths)}
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise ValueError(f"the saved sampler state has {key}={state[key]} but this run has {value}; "
                                 "the order would differ, so the position cannot be restored")
        self.seed = int(state.get("seed", self.seed))
        self.set_epoch(int(state["epoch"]))
        self.skip(int(state["num_consumed"]))

    def epoch_order(self, epoch: Optional[int] = None) -> list[int]:
        """This rank's whole order for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[:2] != (self.seed, epoch):
            self._cache = (self.seed, epoch, self._rank_order(epoch))
        return self._cache[2]

    def _rank_order(self, epoch: int) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        size = self.megabatch_size
        groups = [[i for i, length in enumerate(self.lengths) if length > 0],
                  [i for i, length in enumerate(self.lengths) if length < 0]]
        full, tail = [], []
        for group in groups:
            if not group:
                continue
            shuffled = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            cut = len(shuffled) - len(shuffled) % size
            full += [shuffled[s:s + size] for s in range(0, cut, size)]
            tail += shuffled[cut:]
        full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        order = [i for megabatch in full for i in megabatch] + tail
        padding = (-len(order)) % self.num_replicas
        if padding:
            tail += (order * math.ceil(padding / len(order)))[:padding]
        megabatches = full + [tail[s:s + size] for s in range(0, len(tail), size)]

        mine: list[int] = []
        for megabatch in megabatches:
            # A full megabatch: one micro-batch per rank and accumulation step; the smaller last
            # one: an equal share per rank (its size is a multiple of num_replicas after padding).
            num_chunks = self.num_replicas * self.accumulation if len(megabatch) == size else self.num_replicas
            mixed = len({self.lengths[i] > 0 for i in megabatch}) > 1
            chunks = (_split_by_modality if mixed else _split_balanced)(megabatch, self.lengths, num_chunks)
            for chunk in chunks[self.rank::self.num_replicas]:
                mine += chunk
        return mine

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        start, self._num_skipped = self._num_skipped, 0
        self._position = start
        return self._hand_out(order, start)

    def _hand_out(self, order: list[int], start: int) -> Iterator[int]:
        for index in order[start:]:
            self._position += 1
            yield index

    def __len__(self) -> int:
        return self.num_samples_per_epoch - self._num_skipped
