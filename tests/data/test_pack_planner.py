"""The pack planner and the pack sampler: limits, kept order, determinism, over-long records, ranks, skip."""

import random

import pytest

from vitacore.data.packing import PackSampler, grouped_order, pack_lengths, plan_packs, shuffled_order


def _lengths(n: int, seed: int = 0, low: int = 5, high: int = 120) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def _signed(n: int, seed: int = 0) -> list[int]:
    """Signed modality lengths: two thirds with media (positive), a third text-only (negative)."""
    rng = random.Random(seed)
    return [rng.randint(20, 300) * (1 if i % 3 else -1) for i in range(n)]


def test_packs_keep_the_order_respect_the_limit_and_are_greedy():
    """Setup: 200 lengths in 5..120, a shuffled order, limit 256. Expect: the packs laid end to end are
    the order itself; each pack sums to at most 256; no pack could have taken the next pack's first
    record (next-fit is greedy)."""
    lengths = _lengths(200)
    order = list(range(200))
    random.Random(1).shuffle(order)
    packs = plan_packs(order, lengths, 256)
    assert [i for pack in packs for i in pack] == order
    assert all(sum(lengths[i] for i in pack) <= 256 for pack in packs)
    for pack, following in zip(packs, packs[1:]):
        assert sum(lengths[i] for i in pack) + lengths[following[0]] > 256
    assert len(packs) < len(order) / 2  # several samples per row on average


def test_a_record_longer_than_the_limit_gets_a_pack_alone():
    """Setup: lengths [10, 300, 20, 30, 500, 5], limit 100. Expect: 300 and 500 alone; the others share."""
    packs = plan_packs(range(6), [10, 300, 20, 30, 500, 5], 100)
    assert packs == [(0,), (1,), (2, 3), (4,), (5,)]


def test_plan_limits_and_empty_order():
    """Setup: an empty order; a limit of 0. Expect: no packs; a ValueError naming packing_max_length."""
    assert plan_packs([], [], 10) == []
    with pytest.raises(ValueError, match="packing_max_length 0"):
        plan_packs([0], [1], 0)


def test_pack_lengths_are_absolute_and_capped_at_the_model_length():
    """Setup: signed lengths with one over model_max_length 100. Expect: absolute values, capped at 100
    (the model keeps at most that of a sample), uncapped with None."""
    assert pack_lengths([-40, 70, 250, -300], 100) == [40, 70, 100, 100]
    assert pack_lengths([-40, 250], None) == [40, 250]


def test_the_shuffled_order_is_deterministic_per_seed_and_epoch():
    """Setup: the global order for 50 samples, seeds 3 and 4, epochs 0 and 1. Expect: the same seed and
    epoch give the same permutation twice; another epoch or seed a different one."""
    order = shuffled_order(50, seed=3)
    first = list(order(0))
    assert sorted(first) == list(range(50))
    assert list(shuffled_order(50, seed=3)(0)) == first
    assert list(order(1)) != first and list(shuffled_order(50, seed=4)(0)) != first


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_get_equal_pack_counts_covering_every_sample(world):
    """Setup: 101 samples, limit 300, 1-3 ranks, epochs 0-2. Expect: every rank the same pack count;
    all ranks' packs together hold every sample once, plus padding that repeats the epoch's first
    packs; rank r holds the global packs r, r + world, ...; each epoch's count is what its plan gives."""
    lengths = _lengths(101, seed=2)
    for epoch in range(3):
        samplers = [PackSampler(lengths, 300, world, rank, shuffled_order(101, seed=9)) for rank in range(world)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        global_packs = samplers[0].global_packs(epoch)
        counts = {s.num_samples_per_epoch for s in samplers}
        assert counts == {len(global_packs) // world}
        assert len(global_packs) % world == 0
        dealt = [list(s) for s in samplers]
        assert [pack for i in range(len(dealt[0])) for pack in (d[i] for d in dealt)] == global_packs
        planned = plan_packs(shuffled_order(101, seed=9)(epoch), lengths, 300)
        assert global_packs[:len(planned)] == planned
        assert global_packs[len(planned):] == planned[:len(global_packs) - len(planned)]
        assert sorted(i for pack in planned for i in pack) == list(range(101))


def test_skip_works_in_packs_and_applies_to_the_next_pass_only():
    """Setup: a pack sampler on 2 ranks, epoch 1; skip 3 packs. Expect: the pass yields the epoch's
    packs from the 4th on, the next pass all of them; skipping more than the epoch has is refused."""
    sampler = PackSampler(_lengths(80), 200, 2, 1, shuffled_order(80, seed=0))
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.skip(3)
    assert len(sampler) == len(full) - 3
    assert list(sampler) == full[3:]
    assert list(sampler) == full
    with pytest.raises(ValueError, match=f"cannot skip {len(full) + 1} packs"):
        sampler.skip(len(full) + 1)


def test_a_restarted_sampler_hands_out_the_same_packs():
    """Setup: two pack samplers built alike (a restart), epochs 0-2. Expect: identical packs every epoch."""
    lengths = _signed(120)
    room = pack_lengths(lengths, 250)
    make = lambda: PackSampler(room, 400, 2, 0, grouped_order(lengths, 5, 24, 2))  # noqa: E731
    first, second = make(), make()
    for epoch in range(3):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        assert list(first) == list(second)


def test_packs_of_the_grouped_order_keep_its_modality_grouping():
    """Setup: 300 signed lengths (media / text-only), the grouped order (megabatches of 40, accumulation 2),
    limit 600. Expect: the packs laid end to end are the grouped order; a pack mixes modalities only
    where the order itself changes modality, so mixed packs are at most the order's modality changes."""
    lengths = _signed(300, seed=4)
    order = list(grouped_order(lengths, seed=1, samples_per_step=40, accumulation=2)(0))
    assert sorted(order) == list(range(300))
    packs = plan_packs(order, pack_lengths(lengths, None), 600)
    assert [i for pack in packs for i in pack] == order
    changes = sum((lengths[a] > 0) != (lengths[b] > 0) for a, b in zip(order, order[1:]))
    mixed = sum(len({lengths[i] > 0 for i in pack}) > 1 for pack in packs)
    assert mixed <= changes < len(packs) / 4


def test_bad_sampler_arguments_are_refused():
    """Setup: rank outside the world, limit 0, no samples. Expect: ValueErrors saying which."""
    order = shuffled_order(3, 0)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        PackSampler([1, 2, 3], 10, 2, 2, order)
    with pytest.raises(ValueError, match="packing_max_length 0"):
        PackSampler([1, 2, 3], 0, 1, 0, order)
    with pytest.raises(ValueError, match="no samples"):
        PackSampler([], 10, 1, 0, order)
