"""bench/mfu_data.py: the synthetic samples, padded and packed rows of bench/gpu_mfu.py (no model)."""

import importlib.util
import os
import sys

import pytest
import torch

from vitacore.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


@pytest.fixture(scope="module")
def data():
    sys.path.insert(0, os.path.abspath(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("mfu_data", os.path.join(BENCH, "mfu_data.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve their module while the file executes
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("mfu_data", None)
        sys.path.remove(os.path.abspath(BENCH))


def _samples(data, count=40, max_length=96):
    specs = data.draw_mix(count, seed=3, text_scale=1 / 16, image_tokens=8, max_positions=max_length)
    return data.SyntheticSamples(specs, vocab=100, image_size=8, image_tokens=8, seed=3)


def test_sample_stats_match_the_tensors(data):
    """Setup: 40 samples of the VITA-like mix at tiny scale (8 tokens per image), and 3 fixed-length ones.
    Expect: each sample's stats (text tokens, images, expanded positions, next-token targets) match its
    ids, labels and images; every sample fits the 96-position cap; the mix has text, image and video samples."""
    samples = _samples(data)
    kinds = set()
    for index in range(len(samples)):
        sample, stats = samples[index], samples.stats[index]
        ids, labels = sample["input_ids"], sample["labels"]
        images = int((ids == IMAGE_TOKEN_INDEX).sum())
        assert (stats.images, stats.text_tokens) == (images, len(ids) - images) == (len(sample["images"]),
                                                                                    len(ids) - images)
        assert stats.positions == stats.text_tokens + 8 * images <= 96
        assert stats.supervised == int((labels[1:] != IGNORE_INDEX).sum()) >= 1
        kinds.add(min(images, 2))
    assert kinds == {0, 1, 2}
    fixed = data.SyntheticSamples.fixed(3, text_tokens=10, vocab=100, image_size=8, image_tokens=8, seed=0)
    assert [(s.text_tokens, s.images, s.positions, s.supervised) for s in fixed.stats] == [(10, 1, 18, 9)] * 3


def test_plan_mix_times_the_same_pool_on_both_sides(data):
    """Setup: a plan of 40 timed samples after 8 padded and 3 packed warm-up rows, rows of at most 96 positions.
    Expect: the padded rows are 8 warm-up samples then the 40 timed ones; the packed rows are 3 warm-up
    packs then packs covering exactly those 40 timed samples once, each within 96 positions, fewer packs
    than samples."""
    plan = data.plan_mix(40, 8, 3, text_scale=1 / 16, image_tokens=8, max_length=96, seed=3)
    timed = plan.padded_rows[8:]
    assert len(plan.padded_rows) == 48 and all(len(row) == 1 for row in plan.padded_rows)
    assert len(plan.packed_rows) == 3 + plan.num_timed_packs and plan.num_timed_packs < 40
    assert sorted(i for pack in plan.packed_rows[3:] for i in pack) == sorted(i for (i,) in timed)
    assert not {i for pack in plan.packed_rows[:3] for i in pack} & {i for (i,) in timed}
    stats = [spec.stats(8) for spec in plan.specs]
    assert all(sum(stats[i].positions for i in pack) <= 96 for pack in plan.packed_rows)


def test_packed_rows_follow_the_packed_batch_contract(data):
    """Setup: the plan's packed rows as the Trainer reads them (its seeded shuffle of the items); the first
    3 collated as one micro-batch. Expect: the shuffle reads the rows in plan order; the batch has
    segment_ids 1..k per row in order and 0 on padding, attention_mask = segment_ids > 0, labels -100 and
    pad ids on padding; each segment holds its sample's ids and labels; images and sample_ids are in
    row-major sample order; rows_of recovers the rows from the sample_ids."""
    from vitacore.data.sampler import ResumableSampler

    plan = data.plan_mix(40, 8, 3, text_scale=1 / 16, image_tokens=8, max_length=96, seed=3)
    samples = data.SyntheticSamples(plan.specs, vocab=100, image_size=8, image_tokens=8, seed=3)
    rows = data.Rows(samples, plan.packed_rows, packed=True, seed=42)
    read = [rows[k] for k in ResumableSampler(range(len(rows)), num_replicas=1, rank=0, seed=42)]
    assert [[s["sample_id"] for s in row] for row in read] == [[f"s{i}" for i in p] for p in plan.packed_rows]
    packs = plan.packed_rows[:3]
    batch = data.collate_packed(read[:3])
    flat = [i for pack in packs for i in pack]
    assert batch["sample_ids"] == [f"s{i}" for i in flat]
    assert rows.rows_of(batch["sample_ids"]) == packs
    torch.testing.assert_close(batch["images"], torch.cat([samples[i]["images"] for i in flat]))
    segments = batch["segment_ids"]
    assert torch.equal(batch["attention_mask"], (segments > 0).long())
    assert (batch["labels"][segments == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][segments == 0] == data.PAD_ID).all()
    for r, pack in enumerate(packs):
        offset = 0
        for k, index in enumerate(pack, start=1):
            sample = samples[index]
            n = len(sample["input_ids"])
            assert (segments[r, offset:offset + n] == k).all()
            assert torch.equal(batch["input_ids"][r, offset:offset + n], sample["input_ids"])
            assert torch.equal(batch["labels"][r, offset:offset + n], sample["labels"])
            offset += n
        assert (segments[r, offset:] == 0).all()


def test_padded_rows_have_no_segments(data):
    """Setup: three mix samples collated padded. Expect: one sample per row, right-padded to the longest,
    no segment_ids key, rows read back one sample each."""
    samples = _samples(data)
    batch = data.collate_padded([samples[i] for i in (0, 1, 2)])
    lengths = [len(samples[i]["input_ids"]) for i in (0, 1, 2)]
    assert "segment_ids" not in batch and batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert data.padded_rows_of(batch["sample_ids"]) == [(0,), (1,), (2,)]


def test_a_cap_too_small_for_the_images_says_what_to_raise(data):
    """Setup: the mix drawn with an 8-position cap and 8-token images. Expect: a ValueError naming
    --packing_max_length (a video cannot fit), not silently truncated samples."""
    with pytest.raises(ValueError, match="--packing_max_length"):
        data.draw_mix(50, seed=0, text_scale=1.0, image_tokens=8, max_positions=8)
