"""The resumable sampler: DistributedSampler's order, and a skip that reads nothing it skips."""

import pytest
from torch.utils.data import DistributedSampler

from vitacore.data.sampler import ResumableSampler


class Counting:
    def __init__(self, n):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        self.reads += 1
        return index


@pytest.mark.parametrize("world", [1, 2, 3])
def test_same_order_as_distributed_sampler_for_every_epoch_and_rank(world):
    data = Counting(23)
    for rank in range(world):
        ours = ResumableSampler(data, world, rank, seed=5)
        theirs = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=5)
        for epoch in range(3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)


def test_skip_applies_to_the_next_pass_only():
    sampler = ResumableSampler(Counting(10), 1, 0, seed=0)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.skip(4)
    assert len(sampler) == 6
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the pass after is whole again
    with pytest.raises(ValueError, match="cannot skip 11 samples"):
        sampler.skip(11)


def test_resuming_mid_epoch_reads_no_skipped_sample():
    from torch.utils.data import DataLoader

    data = Counting(40)
    sampler = ResumableSampler(data, 1, 0, seed=0)
    sampler.skip(32)
    batches = list(DataLoader(data, batch_size=8, sampler=sampler))
    assert len(batches) == 1 and data.reads == 8
