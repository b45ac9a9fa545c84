"""Packed rows (several samples per row, ``segment_ids``) give each sample the loss and gradients it has alone.

The reference for every sample is the same model run on that sample by itself (one row, no padding).
The packed forward must reproduce it: per-sample loss sums from ``token_losses``, and the gradient of one
sample's loss (the other samples of its row left in place but unsupervised), within 1e-5 in float32 on
transformers' SDPA attention.
"""

import copy

import pytest
import torch
from tiny_models import TINY, media_batch

from vitacore.constants import IGNORE_INDEX
from vitacore.engine.metrics import sample_token_losses


def _samples():
    """The three samples of media_batch (image, audio, text), each as (ids, labels, images, audios, lengths)."""
    batch = media_batch(TINY)
    samples = []
    for row in range(3):
        keep = batch["attention_mask"][row].bool()
        samples.append({"ids": batch["input_ids"][row][keep], "labels": batch["labels"][row][keep],
                        "images": batch["images"] if row == 0 else batch["images"][:0],
                        "audios": batch["audios"] if row == 1 else batch["audios"][:0],
                        "audio_lengths": batch["audio_lengths"] if row == 1 else batch["audio_lengths"][:0],
                        "audio_token_lengths": batch["audio_token_lengths"] if row == 1
                        else batch["audio_token_lengths"][:0]})
    return samples


def _collate(rows, packed: bool, supervised=None):
    """Rows of samples -> a batch; ``supervised``: only that sample's labels kept (index into all samples)."""
    longest = max(sum(s["ids"].numel() for s in row) for row in rows)
    input_ids = torch.zeros(len(rows), longest, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    segments = torch.zeros(len(rows), longest, dtype=torch.long)
    number = 0
    for r, row in enumerate(rows):
        offset = 0
        for k, sample in enumerate(row, start=1):
            n = sample["ids"].numel()
            input_ids[r, offset:offset + n] = sample["ids"]
            if supervised is None or supervised == number:
                labels[r, offset:offset + n] = sample["labels"]
            mask[r, offset:offset + n] = 1
            segments[r, offset:offset + n] = k
            offset += n
            number += 1
    flat = [s for row in rows for s in row]
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
             **{key: torch.cat([s[key] for s in flat]) for key in ("images", "audios", "audio_lengths",
                                                                   "audio_token_lengths")}}
    if packed:
        batch["segment_ids"] = segments
    return batch


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_each_packed_sample_has_its_unpacked_loss_and_gradients(tiny_vita, chunk_size):
    """Setup: the tiny VITA model (SDPA attention, float32, eval mode for no dropout); samples image, audio,
    text packed as rows [image, audio] and [text] (+ padding), chunked loss (3) and full logits (0).
    Expect: per-sample summed losses equal each sample run alone; and for each sample, the gradient of
    its loss inside the packed batch (the others unsupervised) equals its gradient alone, within 1e-5."""
    tiny_vita.eval()
    tiny_vita.loss_chunk_size = chunk_size
    assert tiny_vita.llm.config._attn_implementation == "sdpa"
    samples = _samples()
    rows = [[samples[0], samples[1]], [samples[2]]]

    with torch.no_grad():
        packed = tiny_vita(**_collate(rows, packed=True))
    sums, counts = sample_token_losses(packed["token_losses"], packed["targets"], packed["segment_ids"])
    assert counts == [3, 2, 3]  # no target crosses from the image sample into the audio sample
    for index, sample in enumerate(samples):
        alone, alone_grads = _loss_and_grads(tiny_vita, _collate([[sample]], packed=False))
        assert sums[index] == pytest.approx(float(alone["loss"].detach()) * counts[index], abs=1e-5)
        _, packed_grads = _loss_and_grads(tiny_vita, _collate(rows, packed=True, supervised=index))
        assert set(alone_grads) <= set(packed_grads) and "llm.lm_head.weight" in alone_grads
        for name, grad in packed_grads.items():  # the row-mates' encoders get zero gradients, absent alone
            want = alone_grads.get(name, torch.zeros_like(grad))
            torch.testing.assert_close(grad, want, rtol=0, atol=1e-5, msg=f"sample {index}: {name}")


def test_without_segments_the_samples_of_a_row_would_see_each_other(tiny_vita):
    """Setup: the same packed row run without ``segment_ids`` (one causal sequence).
    Expect: the audio sample's loss differs from its loss alone: the masking in the packed test is what
    makes them equal, not an insensitive model."""
    tiny_vita.eval()
    samples = _samples()
    with torch.no_grad():
        joined = tiny_vita(**_collate([[samples[0], samples[1]]], packed=False))
        alone = tiny_vita(**_collate([[samples[1]]], packed=False))
    supervised = joined["targets"] != IGNORE_INDEX
    audio_sum = float(joined["token_losses"][supervised][-2:].sum())  # the audio sample's 2 answer tokens
    assert abs(audio_sum - float(alone["loss"].detach()) * 2) > 1e-3


def test_each_packed_sample_is_truncated_alone(make_tiny_vita):
    """Setup: model_max_length 5; a packed row [text sample of 4 tokens, text sample of 7 tokens].
    Expect: positions restart at each sample; the second sample alone is cut to 5 positions; the row is 9."""
    model = make_tiny_vita(model_max_length=5).eval()
    first = {"ids": torch.tensor([11, 12, 13, 14]), "labels": torch.tensor([IGNORE_INDEX, 12, 13, 14])}
    second = {"ids": torch.tensor([1, 2, 3, 4, 5, 6, 7]), "labels": torch.tensor([IGNORE_INDEX, 2, 3, 4, 5, 6, 7])}
    for sample in (first, second):
        sample.update(images=torch.zeros(0, 3, TINY["image_size"], TINY["image_size"]),
                      audios=torch.zeros(0, 1, TINY["mel"]), audio_lengths=torch.zeros(0, dtype=torch.long),
                      audio_token_lengths=torch.zeros(0, dtype=torch.long))
    with torch.no_grad():
        out = model(**_collate([[first, second]], packed=True))
    assert out["segment_ids"].tolist() == [[1, 1, 1, 1, 2, 2, 2, 2, 2]]
    assert out["merged_labels"][0].tolist() == [IGNORE_INDEX, 12, 13, 14, IGNORE_INDEX, 2, 3, 4, 5]


def test_packed_gradients_match_under_a_deep_copy(tiny_vita):
    """Setup: two copies of the tiny model; one trains on the packed batch, one on the samples one by one
    (token-sum losses over the same divisor).
    Expect: the summed gradients agree within 1e-5 (the packed batch is one step over the same tokens)."""
    tiny_vita.eval()
    reference = copy.deepcopy(tiny_vita)
    samples = _samples()
    divisor = torch.tensor(8.0)
    out = tiny_vita(**_collate([[samples[0], samples[1], samples[2]]], packed=True), num_items_in_batch=divisor)
    out["loss"].backward()
    for sample in samples:
        reference(**_collate([[sample]], packed=False), num_items_in_batch=divisor)["loss"].backward()
    for (name, got), want in zip(tiny_vita.named_parameters(), reference.parameters()):
        if want.grad is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-5, msg=name)
