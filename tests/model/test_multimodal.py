"""Tests for vitacore.model.multimodal.VitaModel composed from tiny random parts."""

import torch
import torch.nn.functional as F
from tiny_models import AUDIO_FRAMES, media_batch

from vitacore.constants import IGNORE_INDEX as IGN
from vitacore.data.audio import audio_token_length
from vitacore.model.merge import merge_media_embeddings
from vitacore.model.multimodal import UNIT_PREFIXES


def test_forward_returns_finite_loss_and_merged_labels(tiny_vita, tiny_dims):
    tiny_vita.eval()
    tiny_vita.loss_chunk_size = 0  # the LLM's full logits, returned
    batch = media_batch(tiny_dims)
    out = tiny_vita(**batch)
    assert torch.isfinite(out["loss"])
    image_tokens = (tiny_dims["image_size"] // tiny_dims["patch_size"]) ** 2
    audio_tokens = audio_token_length(AUDIO_FRAMES)
    longest = max(7 - 1 + image_tokens, 5 - 1 + audio_tokens, 4)
    assert out["logits"].shape == (3, longest, tiny_dims["vocab_size"])
    merged = out["merged_labels"]
    assert merged.shape == (3, longest)
    # supervised labels survive in order in each row
    assert merged[0][merged[0] != IGN].tolist() == [4, 5, 6]
    assert merged[1][merged[1] != IGN].tolist() == [9, 10]
    assert merged[2][merged[2] != IGN].tolist() == [12, 13, 14]


def test_loss_equals_llm_loss_on_hand_merged_embeddings(tiny_vita, tiny_dims):
    """The full-logits path (loss_chunk_size 0); tests/model/test_chunked_loss.py covers the chunked one."""
    tiny_vita.eval()
    tiny_vita.loss_chunk_size = 0
    batch = media_batch(tiny_dims)
    with torch.no_grad():
        out = tiny_vita(**batch)
        image_blocks = list(tiny_vita.mm_projector(tiny_vita.vision_tower(batch["images"])))
        states, _ = tiny_vita.audio_encoder(batch["audios"], batch["audio_lengths"])
        audio_blocks = [tiny_vita.audio_adapter(states)[0, : audio_token_length(AUDIO_FRAMES)]]
        merged = merge_media_embeddings(
            batch["input_ids"], batch["labels"], batch["attention_mask"],
            tiny_vita.llm.get_input_embeddings(), image_blocks, audio_blocks, tiny_vita.model_max_length,
        )
        ref = tiny_vita.llm(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask,
                            position_ids=merged.position_ids, labels=merged.labels, use_cache=False)
    torch.testing.assert_close(out["loss"], ref.loss)
    torch.testing.assert_close(out["logits"], ref.logits)
    # and the loss is the mean next-token cross entropy over supervised positions
    logits, labels = ref.logits[:, :-1], merged.labels[:, 1:]
    by_hand = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGN)
    torch.testing.assert_close(out["loss"], by_hand)


def test_text_only_batch_needs_no_media(tiny_vita, tiny_dims):
    tiny_vita.eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    labels = torch.tensor([[IGN, 2, 3, 4]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = tiny_vita(input_ids=ids, labels=labels, attention_mask=mask)
        ref = tiny_vita.llm(input_ids=ids, labels=labels, attention_mask=mask)
    torch.testing.assert_close(out["loss"], ref.loss)


def test_gradients_reach_only_the_trainable_projector(tiny_vita, tiny_dims):
    for name, param in tiny_vita.named_parameters():
        param.requires_grad_(name.startswith("mm_projector."))
    tiny_vita.train()
    out = tiny_vita(**media_batch(tiny_dims))
    out["loss"].backward()
    for name, param in tiny_vita.named_parameters():
        if name.startswith("mm_projector."):
            assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name
        else:
            assert param.grad is None, name


def test_gradients_reach_audio_adapter_and_llm_when_trainable(tiny_vita, tiny_dims):
    for name, param in tiny_vita.named_parameters():
        param.requires_grad_(name.startswith(("audio_adapter.", "llm.")))
    tiny_vita.eval()
    tiny_vita(**media_batch(tiny_dims))["loss"].backward()
    grads = {n: p.grad for n, p in tiny_vita.named_parameters()}
    assert all(grads[n] is not None for n in grads if n.startswith("audio_adapter."))
    assert grads["llm.lm_head.weight"] is not None
    assert all(grads[n] is None for n in grads if n.startswith(("vision_tower.", "mm_projector.", "audio_encoder.")))


def test_eval_units_stay_in_eval_mode_after_train(tiny_vita, tiny_dims):
    tiny_vita.eval_units = ("vision_tower", "audio_encoder")
    tiny_vita.train()
    assert tiny_vita.training
    for unit in ("vision_tower", "audio_encoder"):
        assert all(not m.training for m in getattr(tiny_vita, unit).modules()), unit
    for unit in ("llm", "mm_projector", "audio_adapter"):
        assert all(m.training for m in getattr(tiny_vita, unit).modules()), unit
    tiny_vita.eval()
    assert not any(m.training for m in tiny_vita.modules())


def test_eval_units_keep_dropout_off_in_training(tiny_vita, tiny_dims):
    # the tiny encoders have dropout 0.1: in train mode their outputs would be random
    tiny_vita.eval_units = ("vision_tower", "audio_encoder")
    tiny_vita.train()
    images = torch.randn(2, 3, tiny_dims["image_size"], tiny_dims["image_size"])
    with torch.no_grad():
        a, b = tiny_vita.vision_tower(images), tiny_vita.vision_tower(images)
    assert torch.equal(a, b)
    tiny_vita.eval_units = ()
    tiny_vita.train()
    assert tiny_vita.vision_tower.training


def test_unit_modules_and_prefixes_agree(tiny_vita, tiny_dims):
    units = tiny_vita.unit_modules()
    assert set(units) == {"llm", "vision_tower", "mm_projector", "audio_encoder", "audio_adapter"}
    for name, _ in tiny_vita.named_parameters():
        owners = [u for u, prefixes in UNIT_PREFIXES.items() if name.startswith(prefixes)]
        assert len(owners) == 1 and owners[0] in units, name
    assert tiny_vita.config is tiny_vita.llm.config


def test_model_max_length_truncates_before_the_llm(make_tiny_vita, tiny_dims):
    # max length 5 falls inside the image block of row 0 (starts at 2) and the audio block of row 1
    # (starts at 1): both rows are cut right before their block; the 4-token text row is kept whole
    model = make_tiny_vita(model_max_length=5).eval()
    with torch.no_grad():
        out = model(**media_batch(tiny_dims))
    assert out["merged_labels"].shape == (3, 4)
    assert out["merged_labels"].tolist() == [[IGN] * 4, [IGN] * 4, [IGN, 12, 13, 14]]
    assert torch.isfinite(out["loss"])


def test_encode_audio_cuts_each_clip_to_its_token_count(tiny_vita, tiny_dims):
    tiny_vita.eval()
    frames = [90, 40]
    batch = media_batch(tiny_dims, frames)
    with torch.no_grad():
        blocks = tiny_vita.encode_audio(batch["audios"], batch["audio_lengths"], batch["audio_token_lengths"])
    assert [b.shape for b in blocks] == [(audio_token_length(n), tiny_dims["llm_hidden"]) for n in frames]
    with torch.no_grad():
        out = tiny_vita(**batch)
    assert torch.isfinite(out["loss"])


def test_audio_embeddings_do_not_depend_on_batch_padding(tiny_vita, tiny_dims):
    tiny_vita.eval()
    torch.manual_seed(5)
    short = torch.randn(40, tiny_dims["mel"])
    long = torch.randn(120, tiny_dims["mel"])
    padded = torch.zeros(2, 120, tiny_dims["mel"])
    padded[0], padded[1, :40] = long, short
    n_short = audio_token_length(40)
    with torch.no_grad():
        alone = tiny_vita.encode_audio(short[None], torch.tensor([40]), torch.tensor([n_short]))[0]
        batched = tiny_vita.encode_audio(padded, torch.tensor([120, 40]),
                                         torch.tensor([audio_token_length(120), n_short]))[1]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
