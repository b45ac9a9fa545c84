"""The packed training loader: the packed-batch contract on the demo's stage-4 data, equal micro-batch
counts on every rank, exact resume in packs, and the loss divisor without segment starts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import built_stage_recipe

import vitacore
from vitacore.constants import IGNORE_INDEX
from vitacore.data.bad_samples import BadSample
from vitacore.data.dataset import Collator, Sample
from vitacore.data.packed_batch import PackedCollator, PackedDataset
from vitacore.engine import LoopConfig
from vitacore.engine.distributed import DistInfo
from vitacore.engine.loader import (
    accumulation_groups,
    build_train_loader,
    loss_divisor,
    micro_batches_in_epoch,
    num_optimizer_steps,
    pack_sampler,
    train_sampler,
)

PAD = 0


@pytest.fixture(scope="module")
def stage4(vitacore_cache, tmp_path_factory):
    """The demo's stage-4 recipe, its parts built (embedded default model, image/video/audio/text data)."""
    return built_stage_recipe("4", str(tmp_path_factory.mktemp("packed")))


def _rank(rank: int, world: int) -> DistInfo:
    """Where rank ``rank`` of ``world`` sits (the samplers read only rank and world size)."""
    return DistInfo(rank, world, 0, torch.device("cpu"))


class Records(list):
    """Text-only samples with their signed lengths, as a VitaJsonDataset gives them."""

    @property
    def modality_lengths(self) -> list[int]:
        return [-len(sample.input_ids) for sample in self]


def _records(n: int, seed: int = 0) -> Records:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (n,), generator=gen).tolist()
    return Records(Sample(f"r{i}", list(range(1, length + 1)), list(range(1, length + 1)), [], [], [], "lang")
                   for i, length in enumerate(lengths))


def _expanded_length(dataset, sample: Sample) -> int:
    """The sample's tokens in the model, media expanded (as modality_lengths counts them)."""
    from vitacore.constants import AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX

    text = sum(1 for t in sample.input_ids if t not in (IMAGE_TOKEN_INDEX, AUDIO_TOKEN_INDEX))
    return text + len(sample.images) * dataset.tokens_per_image + sum(sample.audio_token_lengths)


def test_a_packed_batch_of_the_demo_data_meets_the_contract(stage4):
    """Setup: the stage-4 demo data (images, video, audio, text), --packing with --packing_max_length 512,
    the run's loader with micro-batches of 3 packs. Expect: each row holds its packs' samples end to end
    (segment k = the k-th sample's ids and labels, 0 exactly on padding); images and audios equal the
    plain Collator's over the same samples in row-major order; per-sample ids, modalities and datasets;
    each row's media-expanded length within 512."""
    train, collator = stage4.data.train, stage4.data.collator
    loop = dataclasses.replace(stage4.specs.loop, packing=True, packing_max_length=512,
                               per_device_train_batch_size=3)
    sampler, loader, _ = build_train_loader(train, collator, loop, stage4.dist)
    sampler.set_epoch(0)
    batch = next(iter(loader))
    packs = sampler.rank_packs(0)[:3]
    samples = [[train[i] for i in pack] for pack in packs]
    flat = [s for pack in samples for s in pack]
    assert max(len(p) for p in packs) > 2  # several samples per row
    segment_ids = batch["segment_ids"]
    assert segment_ids.dtype == torch.long and segment_ids.shape == batch["input_ids"].shape
    for row, pack in enumerate(samples):
        assert sum(_expanded_length(train, s) for s in pack) <= 512
        for k, sample in enumerate(pack, start=1):
            where = segment_ids[row] == k
            assert batch["input_ids"][row][where].tolist() == sample.input_ids
            assert batch["labels"][row][where].tolist() == sample.labels
        padding = segment_ids[row] == 0
        assert (batch["attention_mask"][row] == (~padding).long()).all()
        assert (batch["input_ids"][row][padding] == collator.pad_token_id).all()
        assert (batch["labels"][row][padding] == IGNORE_INDEX).all()
        assert segment_ids[row][~padding].tolist() == sorted(segment_ids[row][~padding].tolist())  # contiguous
    plain = collator(flat)
    for key in ("images", "audios", "audio_lengths", "audio_token_lengths"):
        assert torch.equal(batch[key], plain[key]), key
    assert batch["sample_ids"] == plain["sample_ids"] == [s.sample_id for s in flat]
    assert batch["sample_modalities"] == [s.media for s in flat]
    assert batch["sample_datasets"] == [s.dataset for s in flat]
    assert {"image", "video", "audio", "text"} & set(batch["sample_modalities"])


def test_bad_samples_are_marked_per_sample():
    """Setup: two packs, one sample in the second standing in for a bad record. Expect: ``bad_samples``
    holds that marker once; a batch without replaced samples has no such key."""
    good = _records(5)
    marker = BadSample("missing image file x.png", "x.png", 7, 8)
    stand_in = dataclasses.replace(good[3], replaced_from=marker)
    collate = PackedCollator(Collator(PAD))
    assert collate([[good[0], good[1]], [good[2], stand_in, good[4]]])["bad_samples"] == [marker]
    assert "bad_samples" not in collate([[good[0]], [good[1], good[2]]])


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_same_number_of_micro_batches(stage4, world):
    """Setup: the demo data's packs for 2 and 3 ranks, 3 packs a micro-batch, epochs 0-2, shuffled and
    grouped orders. Expect: every rank has as many micro-batches as the others in each epoch, and all
    ranks together read every sample of the epoch."""
    train = stage4.data.train
    for grouped in (False, True):
        loop = dataclasses.replace(stage4.specs.loop, packing=True, packing_max_length=600,
                                   per_device_train_batch_size=3, group_by_modality_length=grouped)
        samplers = [pack_sampler(train, loop, _rank(rank, world)) for rank in range(world)]
        for epoch in range(3):
            counts = {micro_batches_in_epoch(s, 3, epoch) for s in samplers}
            assert len(counts) == 1, (grouped, epoch, counts)
            seen = {i for s in samplers for pack in s.rank_packs(epoch) for i in pack}
            assert seen == set(range(len(train)))


def _group_ids(loop: LoopConfig, data, epoch: int = 0, micro: int = 0, num_groups: int = 100) -> list[list[str]]:
    """The sample ids of each accumulation group a (fresh) packed loader yields from ``(epoch, micro)``."""
    sampler, loader, generator = build_train_loader(data, Collator(PAD), loop, _rank(0, 1))
    micro_in_epoch = lambda e: micro_batches_in_epoch(sampler, loop.per_device_train_batch_size, e)  # noqa: E731
    groups = accumulation_groups(loader, sampler, generator, loop, micro_in_epoch, epoch, micro)
    out = []
    for group in groups:
        assert group.failure is None
        out.append([(group.epoch, sid) for batch in group.batches for sid in batch["sample_ids"]])
        if len(out) == num_groups:
            return out
    return out


@pytest.mark.parametrize("workers", [0, 1])
def test_a_resumed_loader_yields_exactly_the_remaining_packs(workers):
    """Setup: 90 text records, packs of up to 64 tokens, 2 packs a micro-batch, accumulation 2; the groups
    of an uninterrupted run over 2+ epochs, then fresh loaders started at micro-batch 4 of epoch 0 and
    at micro-batch 2 of epoch 1 (0 and 1 workers). Expect: each yields exactly the uninterrupted run's
    groups from that point on, epoch boundary included."""
    data = _records(90)
    loop = LoopConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, packing=True,
                      packing_max_length=64, seed=3, dataloader_num_workers=workers)
    sampler = pack_sampler(data, loop, _rank(0, 1))
    per_epoch = [micro_batches_in_epoch(sampler, 2, e) for e in range(2)]
    groups_per_epoch = [-(-m // 2) for m in per_epoch]
    full = _group_ids(loop, data, num_groups=sum(groups_per_epoch) + 2)
    assert sorted(sid for _, sid in sum(full[:groups_per_epoch[0]], [])) == sorted(s.sample_id for s in data)
    assert _group_ids(loop, data, 0, 4, len(full) - 2) == full[2:]
    start = groups_per_epoch[0] + 1
    assert _group_ids(loop, data, 1, 2, len(full) - start) == full[start:]


def test_steps_of_epochs_follow_each_epochs_own_micro_batch_count():
    """Setup: micro-batch counts 7, 9, 8 for epochs 0-2, accumulation 2. Expect: 1 epoch -> 4 steps,
    2 -> 4 + 5, 2.5 -> 9 + ceil(0.5 x 4) = 11; equal counts keep the HF Trainer's ceil(epochs x steps)."""
    counts = [7, 9, 8]
    steps = lambda epochs, micro: num_optimizer_steps(  # noqa: E731
        LoopConfig(gradient_accumulation_steps=2, num_train_epochs=epochs, packing=True, packing_max_length=8), micro)
    assert steps(1.0, counts.__getitem__) == 4
    assert steps(2.0, counts.__getitem__) == 9
    assert steps(2.5, counts.__getitem__) == 11
    assert steps(2.5, lambda epoch: 7) == 10  # ceil(2.5 x 4)


def test_loss_divisor_leaves_out_the_first_token_of_each_segment(dist):
    """Setup: one packed row of three segments (lengths 3, 4, 2) then 2 padding tokens, every label set
    on real tokens; and the same labels without segment ids. Expect: the packed divisor counts 9 - 1
    (position 0 is never a target) - 2 (the starts of segments 2 and 3) = 6 targets; the unpacked one 8."""
    labels = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, IGNORE_INDEX, IGNORE_INDEX]])
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0]])
    packed = {"labels": labels, "segment_ids": segment_ids}
    assert float(loss_divisor([packed], dist, 1)) == 6.0
    assert float(loss_divisor([{"labels": labels}], dist, 1)) == 8.0
    assert float(loss_divisor([packed, packed], dist, 2)) == 6.0  # summed over the group, / accumulation


def test_packing_needs_modality_lengths():
    """Setup: --packing over a plain list of samples. Expect: a ValueError naming --packing and modality_lengths."""
    loop = LoopConfig(packing=True, packing_max_length=64)
    with pytest.raises(ValueError, match="--packing True needs a training dataset with `modality_lengths`"):
        train_sampler(list(_records(4)), loop, _rank(0, 1))


def test_packing_flags_are_validated():
    """Setup: --packing_max_length below --model_max_length; --packing_max_length without --packing;
    --packing without a length. Expect: errors naming both flags and the fix; the length resolves to
    --model_max_length when unset; LoopConfig refuses packing without a length."""
    with pytest.raises(vitacore.ConfigError, match=r"--packing_max_length 300 is below --model_max_length 512.*raise"):
        vitacore.parse_args(["--packing", "True", "--packing_max_length", "300"])
    with pytest.raises(vitacore.ConfigError, match="--packing_max_length 900 has no effect without --packing True"):
        vitacore.parse_args(["--packing_max_length", "900"])
    from vitacore.recipes.specs import loop_config

    resolved = loop_config(vitacore.parse_args(["--packing", "True", "--model_max_length", "700"]))
    assert resolved.packing and resolved.packing_max_length == 700
    with pytest.raises(ValueError, match="packing needs packing_max_length"):
        LoopConfig(packing=True)


def test_the_packed_dataset_reads_a_packs_samples():
    """Setup: a packed view of 6 records. Expect: item (4, 1) is records 4 and 1, in that order."""
    data = _records(6)
    assert PackedDataset(data)[(4, 1)] == [data[4], data[1]]


def test_a_metrics_window_counts_the_samples_of_packed_rows():
    """Setup: a packed batch of 2 rows holding 5 samples, then an unpacked batch of 3 rows. Expect: the
    window counts 5 + 3 samples (the bad-sample ratio and samples/s divide by samples, not rows)."""
    from vitacore.engine.metrics import MetricsWindow

    data = _records(8)
    window = MetricsWindow()
    window.add(1.0, PackedCollator(Collator(PAD))([data[:2], data[2:5]]), share_of_step=True)
    window.add(1.0, Collator(PAD)(data[5:]), share_of_step=True)
    assert window.samples == 8


def test_a_packed_trainer_runs_whole_epochs_of_their_own_lengths(dist, tmp_path):
    """Setup: the Trainer (real DeepSpeed, a tiny text-only model) on 40 records, --packing with rows of up
    to 48 tokens, 2 packs a micro-batch, 2 epochs. Expect: its optimizer steps are the two epochs' own
    micro-batch counts added up; each epoch trains every sample exactly once; the run ends at epoch 2.0."""
    from test_loop import make_config, make_model, make_trainer

    data = _records(40, seed=5)
    cfg = make_config(tmp_path, max_steps=-1, num_train_epochs=2.0, per_device_train_batch_size=2, packing=True,
                      packing_max_length=48)
    model = make_model()
    seen: list[list[str]] = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(list(kw["sample_ids"])) if m.training else None, with_kwargs=True)
    trainer = make_trainer(dist, cfg, model, data)
    per_epoch = [trainer.micro_in_epoch(epoch) for epoch in range(2)]
    assert per_epoch[0] != per_epoch[1]  # each epoch packs its own order: 11 and 12 micro-batches here
    assert trainer.total_steps == sum(per_epoch)
    result = trainer.fit()
    assert result.num_steps == sum(per_epoch) == len(seen)
    everything = sorted(s.sample_id for s in data)
    assert sorted(sum(seen[:per_epoch[0]], [])) == everything
    assert sorted(sum(seen[per_epoch[0]:], [])) == everything
    assert result.rows[-1]["epoch"] == pytest.approx(2.0)
