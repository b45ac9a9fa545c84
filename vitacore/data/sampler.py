"""A distributed sampler that restarts mid-epoch without reading the samples it skips."""

from __future__ import annotations

from torch.utils.data import Dataset, DistributedSampler, Sampler


class ResumableSampler(Sampler[int]):
    """Each rank's share of a seeded per-epoch shuffle (the order ``DistributedSampler`` gives).

    :meth:`skip` drops the first samples of the next pass only: a resumed run starts where its
    checkpoint stopped by index arithmetic, so no sample is loaded or decoded to get there.

    Args:
        dataset: the dataset (only its length is used).
        num_replicas: ranks in the job.
        rank: this rank.
        seed: shuffle seed; epoch ``e`` uses ``seed + e``.
        shuffle: shuffle each epoch (else dataset order).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        self._order = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                                         drop_last=False)
        self.epoch = 0
        self._num_skipped = 0

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order (call before every pass)."""
        self.epoch = epoch
        self._order.set_epoch(epoch)

    def skip(self, num_samples: int) -> None:
        """Leave out the first ``num_samples`` of this rank's next pass."""
        if not 0 <= num_samples <= len(self._order):
            raise ValueError(f"cannot skip {num_samples} samples of an epoch of {len(self._order)} on this rank")
        self._num_skipped = num_samples

    @property
    def num_samples_per_epoch(self) -> int:
        """This rank's samples in a whole epoch."""
        return len(self._order)

    def __iter__(self):
        start, self._num_skipped = self._num_skipped, 0
        return iter(list(self._order)[start:])

    def __len__(self) -> int:
        return len(self._order) - self._num_skipped
