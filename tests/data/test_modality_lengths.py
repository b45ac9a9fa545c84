"""Modality lengths in tokens (media counted, from headers only) and the grouped Trainer end to end.

The data is stage 4's mix of the embedded synthetic data (image, video, audio, text) with the
embedded default model, so token counts come from the real tower and audio encoder.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image
from tiny_models import built_stage_recipe

import vitacore
from vitacore.constants import AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX
from vitacore.data.audio import AudioTransform, write_wav
from vitacore.data.dataset import VIDEO_MAX_FRAMES, VitaJsonDataset
from vitacore.data.grouped_sampler import ModalityLengthGroupedSampler
from vitacore.data.lengths import count_video_frames


@pytest.fixture(scope="module")
def stage4(vitacore_cache, tmp_path_factory):
    """(recipe, bundle, data) for stage 4 on the embedded default (the recipe's parts: specs, dist, ...)."""
    recipe = built_stage_recipe("4", str(tmp_path_factory.mktemp("grouped")))
    bundle = recipe.bundle
    for name, param in bundle.model.named_parameters():  # only the order matters here: a cheap backward
        param.requires_grad = name == "llm.model.norm.weight"
    return recipe, bundle, recipe.data


def _exact_length(dataset: VitaJsonDataset, index: int) -> int:
    """What the model's input holds for sample ``index``: text ids plus the media spliced in."""
    sample = dataset[index]
    text = sum(1 for i in sample.input_ids if i not in (IMAGE_TOKEN_INDEX, AUDIO_TOKEN_INDEX))
    total = text + len(sample.images) * dataset.tokens_per_image + sum(sample.audio_token_lengths)
    return total if (sample.images or sample.audios) else -total


def test_lengths_are_the_model_input_lengths_with_media(stage4):
    _, bundle, data = stage4
    train = data.train
    assert train.tokens_per_image == bundle.model.vision_tower.num_tokens_per_image
    lengths = train.modality_lengths
    assert len(lengths) == len(train) and 0 not in lengths
    modalities = {}
    for index in range(0, len(train), 7):  # every kind of record, at a fraction of the decode cost
        assert lengths[index] == _exact_length(train, index), train.records[index]["id"]
        modalities.setdefault(train[index].modality if train.records[index].get("audio") is None else "audio", index)
    assert {"image", "video", "audio", "lang"} <= set(modalities)
    assert train.modality_lengths is lengths  # computed once


def test_text_only_records_are_negative_and_media_records_positive(stage4):
    train = stage4[2].train
    for record, length in zip(train.records, train.modality_lengths):
        has_media = any(record.get(k) for k in ("image", "video", "audio"))
        assert (length > 0) == has_media


def test_images_without_tokens_per_image_is_an_error(stage4):
    train = stage4[2].train
    bare = VitaJsonDataset(train.records, train.media_root, train.tokenizer, train.template,
                           train.image_transform, train.audio_transform)
    with pytest.raises(ValueError, match="tokens_per_image"):
        _ = bare.modality_lengths


@pytest.mark.parametrize("rate", [16000, 8000, 22050, 44100])
@pytest.mark.parametrize("seconds", [0.03, 0.8, 2.345])
def test_audio_tokens_from_the_header_match_decoding(tmp_path, rate, seconds):
    path = tmp_path / "clip.wav"
    rng = np.random.default_rng(0)
    write_wav(path, rng.uniform(-0.5, 0.5, size=(int(rate * seconds), 2)), rate)
    transform = AudioTransform()
    assert transform.num_tokens_from_header(path) == transform(path)[1]


def test_audio_header_of_a_missing_or_broken_file_counts_zero(tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not a wav")
    assert AudioTransform().num_tokens_from_header(broken) == 0
    assert AudioTransform().num_tokens_from_header(tmp_path / "missing.wav") == 0


# At 3 fps every frame is a position; VITA stretches fewer than 4 to 4 and thins more than 16 to 16.
@pytest.mark.parametrize("frames,expected", [(1, 4), (5, 5), (VIDEO_MAX_FRAMES + 9, VIDEO_MAX_FRAMES)])
def test_video_frames_counted_without_decoding(tmp_path, frames, expected):
    path = tmp_path / "clip.gif"
    images = [Image.new("RGB", (8, 8), (10 * i, 0, 0)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=333)
    assert count_video_frames(str(path), VIDEO_MAX_FRAMES) == expected
    assert count_video_frames(str(tmp_path / "missing.gif"), VIDEO_MAX_FRAMES) == 1


def _run(recipe, bundle, train, collator, dist, **training) -> list[list[str]]:
    """Train with ``training`` overrides of the loop config; return the sample ids of every training micro-batch."""
    loop = dataclasses.replace(recipe.specs.loop, **training)
    optim = recipe.specs.optim
    model = bundle.model
    groups = vitacore.param_groups_for_run(model, vitacore.UNIT_PREFIXES, optim)
    ds_config, _ = vitacore.resolve_deepspeed_config(
        recipe.specs.deepspeed, loop=loop, optim=optim, world_size=dist.world_size,
        hidden_size=model.llm.config.hidden_size, bf16=recipe.specs.bf16, fp16=recipe.specs.fp16)
    checkpointer = vitacore.Checkpointer(recipe.specs.checkpoint, dist)
    seen: list[list[str]] = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(list(kw["sample_ids"])) if m.training else None, with_kwargs=True)
    try:
        vitacore.Trainer(model, groups, train, collator, dist, loop=loop, optim=optim, deepspeed_config=ds_config,
                         checkpointer=checkpointer).fit()
    finally:
        hook.remove()
    return seen


def test_grouped_trainer_micro_batches_are_single_modality(stage4, dist):
    recipe, bundle, data = stage4
    train = data.train
    sign = {str(r["id"]): length > 0 for r, length in zip(train.records, train.modality_lengths)}
    batches = _run(recipe, bundle, train, data.collator, dist, group_by_modality_length=True,
                   per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=12)
    assert len(batches) == 12
    assert all(len({sign[i] for i in batch}) == 1 for batch in batches)
    # The whole epoch's order: 1560 media and 120 text records, both multiples of 8, so no mixed tail.
    sampler = ModalityLengthGroupedSampler(train.modality_lengths, 8, 1, 0, seed=recipe.specs.loop.seed)
    epoch = sampler.epoch_order(0)
    chunks = [epoch[s:s + 8] for s in range(0, len(epoch), 8)]
    assert all(len({train.modality_lengths[i] > 0 for i in chunk}) == 1 for chunk in chunks)
    assert sorted(epoch) == list(range(len(train)))


def test_persistent_workers_give_the_same_batches_across_epochs(stage4, dist):
    recipe, bundle, data = stage4
    full = data.train
    small = VitaJsonDataset(full.records[::40], full.media_root, full.tokenizer, full.template,
                            full.image_transform, full.audio_transform, tokens_per_image=full.tokens_per_image)
    common = dict(group_by_modality_length=True, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                  max_steps=14)  # 42 samples: 11 micro-batches an epoch, so the run crosses into a second
    plain = _run(recipe, bundle, small, data.collator, dist, dataloader_num_workers=0, **common)
    workers = _run(recipe, bundle, small, data.collator, dist, dataloader_num_workers=2,
                   dataloader_persistent_workers=True, dataloader_prefetch_factor=3, **common)
    assert workers == plain
    assert plain[11:] != plain[:3]  # epochs differ, so the equality covers the per-epoch re-seeding
