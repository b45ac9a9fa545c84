"""VITA's modality- and length-grouped sampler: grouping, determinism, rank coverage, exact resume."""

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from vitacore.data.grouped_sampler import ModalityLengthGroupedSampler


def mixed_lengths(n_mm: int, n_text: int, seed: int = 0) -> list[int]:
    """Positive lengths for samples with media, negative for text-only ones, interleaved at random."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(1, 500, (n_mm,), generator=gen)]
    lengths += [-int(x) for x in torch.randint(1, 500, (n_text,), generator=gen)]
    return [lengths[i] for i in torch.randperm(len(lengths), generator=gen).tolist()]


def rank_orders(lengths, world, batch, accum, seed=3, epoch=0) -> list[list[int]]:
    orders = []
    for rank in range(world):
        sampler = ModalityLengthGroupedSampler(lengths, batch, world, rank, seed=seed, accumulation=accum)
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    return orders


def micro_batches(order, batch):
    return [order[s:s + batch] for s in range(0, len(order), batch)]


CASES = [(1, 2, 1), (2, 3, 2), (4, 2, 3), (3, 4, 1)]  # (world, batch, accumulation)


@pytest.mark.parametrize("world,batch,accum", CASES)
def test_micro_batches_are_single_modality_and_sorted_within_megabatches(world, batch, accum):
    lengths = mixed_lengths(157, 101)
    orders = rank_orders(lengths, world, batch, accum)
    per_rank_full = (157 // (world * batch * accum) + 101 // (world * batch * accum)) * batch * accum
    mixed = 0
    for order in orders:
        for index, mb in enumerate(micro_batches(order, batch)):
            signs = {lengths[i] > 0 for i in mb}
            if index * batch < per_rank_full:
                assert len(signs) == 1  # the full megabatches never mix modalities
                sizes = [abs(lengths[i]) for i in mb]
                assert sizes == sorted(sizes, reverse=True)  # longest first inside a micro-batch
            mixed += len(signs) > 1
    assert mixed <= 2  # only the tail (at most two megabatches) has one mixed micro-batch each


def test_one_optimizer_step_draws_from_one_megabatch_balanced_in_tokens():
    # Single modality, 2 ranks x batch 4 x accumulation 2: each step's 16 samples are one
    # megabatch; the 4 micro-batches of a step split it with near-equal token totals.
    lengths = mixed_lengths(64, 0, seed=5)
    world, batch, accum = 2, 4, 2
    orders = rank_orders(lengths, world, batch, accum)
    steps = len(orders[0]) // (batch * accum)
    for step in range(steps):
        chunks = [order[step * batch * accum:(step + 1) * batch * accum] for order in orders]
        step_ids = [i for chunk in chunks for i in chunk]
        assert len(set(step_ids)) == world * batch * accum
        totals = [sum(lengths[i] for i in mb) for chunk in chunks for mb in micro_batches(chunk, batch)]
        assert max(totals) - min(totals) <= max(lengths[i] for i in step_ids)


@pytest.mark.parametrize("world,batch,accum", CASES)
@pytest.mark.parametrize("n_mm,n_text", [(157, 101), (40, 0), (0, 37), (5, 2), (1, 0)])
def test_no_sample_lost_or_repeated_across_ranks(world, batch, accum, n_mm, n_text):
    lengths = mixed_lengths(n_mm, n_text)
    n = len(lengths)
    orders = rank_orders(lengths, world, batch, accum, epoch=2)
    assert len({len(order) for order in orders}) == 1  # same number of micro-batches on every rank
    assert len(orders[0]) == -(-n // world)
    counts = Counter(i for order in orders for i in order)
    assert set(counts) == set(range(n))
    # The documented padding: (-n) % world extra copies, like DistributedSampler.
    assert sum(counts.values()) - n == (-n) % world


def test_order_is_fixed_by_seed_and_epoch():
    lengths = mixed_lengths(90, 60)
    first = rank_orders(lengths, 2, 3, 2, seed=1, epoch=4)
    assert rank_orders(lengths, 2, 3, 2, seed=1, epoch=4) == first
    assert rank_orders(lengths, 2, 3, 2, seed=1, epoch=5) != first
    assert rank_orders(lengths, 2, 3, 2, seed=2, epoch=4) != first
    # set_epoch on one sampler switches orders back and forth.
    sampler = ModalityLengthGroupedSampler(lengths, 3, 2, 0, seed=1, accumulation=2)
    sampler.set_epoch(4)
    four = list(sampler)
    sampler.set_epoch(5)
    assert list(sampler) != four
    sampler.set_epoch(4)
    assert list(sampler) == four == first[0]


@pytest.mark.parametrize("sign", [1, -1])
def test_single_modality_data(sign):
    lengths = [sign * x for x in mixed_lengths(50, 0, seed=2)]
    orders = rank_orders(lengths, 2, 4, 1)
    assert sorted(i for order in orders for i in order) == list(range(50))
    for order in orders:
        for mb in micro_batches(order, 4):
            sizes = [abs(lengths[i]) for i in mb]
            assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("consumed", [0, 1, 7, 24, 30])
def test_state_dict_resumes_at_the_exact_sample(consumed):
    lengths = mixed_lengths(41, 19)
    sampler = ModalityLengthGroupedSampler(lengths, 4, 2, 1, seed=9, accumulation=2)
    sampler.set_epoch(3)
    full = list(sampler)
    assert len(full) == 30
    iterator = iter(sampler)
    taken = [next(iterator) for _ in range(consumed)]
    state = sampler.state_dict()
    assert state["epoch"] == 3 and state["num_consumed"] == consumed and state["seed"] == 9

    fresh = ModalityLengthGroupedSampler(lengths, 4, 2, 1, seed=0, accumulation=2)  # seed comes from the state
    fresh.load_state_dict(state)
    assert len(fresh) == 30 - consumed
    assert taken + list(fresh) == full
    assert list(fresh) == full  # the pass after is whole again

    # The Trainer's way: epoch and samples consumed, restored with set_epoch + skip.
    by_skip = ModalityLengthGroupedSampler(lengths, 4, 2, 1, seed=9, accumulation=2)
    by_skip.set_epoch(3)
    by_skip.skip(consumed)
    assert list(by_skip) == full[consumed:]


def test_state_dict_follows_set_epoch_and_skip():
    sampler = ModalityLengthGroupedSampler(mixed_lengths(10, 10), 2, 1, 0, seed=0)
    sampler.set_epoch(1)
    assert sampler.state_dict()["num_consumed"] == 0
    list(sampler)
    assert sampler.state_dict()["num_consumed"] == 20
    sampler.set_epoch(2)
    assert sampler.state_dict()["num_consumed"] == 0
    sampler.skip(6)
    state = sampler.state_dict()
    assert (state["epoch"], state["num_consumed"]) == (2, 6)


def test_a_state_from_another_layout_is_refused():
    lengths = mixed_lengths(10, 10)
    state = ModalityLengthGroupedSampler(lengths, 2, 2, 0, seed=0).state_dict()
    other = ModalityLengthGroupedSampler(lengths, 4, 2, 0, seed=0)
    with pytest.raises(ValueError, match="batch_size=2 but this run has 4"):
        other.load_state_dict(state)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="sample 1 has modality length 0"):
        ModalityLengthGroupedSampler([3, 0, -2], 1, 1, 0, seed=0)
    sampler = ModalityLengthGroupedSampler([3, -2, 4], 1, 1, 0, seed=0)
    with pytest.raises(ValueError, match="cannot skip 4 samples"):
        sampler.skip(4)


def test_resuming_through_a_dataloader_reads_no_skipped_sample():
    from test_sampler import Counting  # tests/data/test_sampler.py: a dataset that counts its reads

    data = Counting(40)
    sampler = ModalityLengthGroupedSampler(mixed_lengths(25, 15), 8, 1, 0, seed=0)
    full = list(sampler)
    sampler.skip(32)
    batches = list(DataLoader(data, batch_size=8, sampler=sampler))
    assert data.reads == 8 and batches[0].tolist() == full[32:]
