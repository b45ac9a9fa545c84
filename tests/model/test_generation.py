"""Tests for vitacore.model.generation: prompts answered with media merged as in training."""

import pytest
import torch

from vitacore.constants import AUDIO_TOKEN_INDEX as AUD
from vitacore.constants import IGNORE_INDEX as IGN
from vitacore.constants import IMAGE_TOKEN_INDEX as IMG
from vitacore.data.audio import audio_token_length

PAD = 0
PROMPTS = [  # an image prompt, an audio prompt, a text prompt: three lengths, three media mixes
    [5, 6, IMG, 7, 8, 9, 10],
    [11, AUD, 12, 13],
    [14, 15, 16, 17, 18, 19, 20, 21, 22],
]
AUDIO_FRAMES = 40


def _media(dims, rows):
    """The media of ``rows`` (indices into PROMPTS), as the collator stacks them."""
    torch.manual_seed(7)
    images = torch.randn(3, 3, dims["image_size"], dims["image_size"])
    audio = torch.randn(1, AUDIO_FRAMES, dims["mel"])
    out = {}
    if 0 in rows:
        out["images"] = images[:1]
    if 1 in rows:
        out.update(audios=audio, audio_lengths=torch.tensor([AUDIO_FRAMES]),
                   audio_token_lengths=torch.tensor([audio_token_length(AUDIO_FRAMES)]))
    return out


def _batch(dims, rows=(0, 1, 2)):
    """Prompt rows right-padded, as the training collator pads them."""
    prompts = [PROMPTS[r] for r in rows]
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), PAD)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)] = torch.tensor(prompt)
        mask[i, : len(prompt)] = 1
    return {"input_ids": ids, "attention_mask": mask, **_media(dims, rows)}


def _media_tokens(model, ids):
    """Merged positions taken by the media of a row's ids."""
    return sum(model.vision_tower.num_tokens_per_image if t == IMG else audio_token_length(AUDIO_FRAMES)
               for t in ids.tolist() if t in (IMG, AUD))


def _teacher_forced_next(model, batch):
    """Per row, the argmax of the training forward's logits at the prompt's last position."""
    model.loss_chunk_size = 0  # the full-logits path, which returns the logits
    with torch.no_grad():
        out = model(labels=torch.full_like(batch["input_ids"], IGN), **batch)
    next_tokens = []
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        last = len(ids) - int((ids < 0).sum()) + _media_tokens(model, ids) - 1  # training pads on the right
        next_tokens.append(int(out["logits"][row, last].argmax()))
    return next_tokens


def test_first_token_is_the_argmax_of_the_training_forward(tiny_vita, tiny_dims):
    tiny_vita.eval()
    batch = _batch(tiny_dims)
    answers = tiny_vita.generate(**batch, max_new_tokens=4, eos_token_id=63, pad_token_id=PAD)
    assert [a[0] for a in answers] == _teacher_forced_next(tiny_vita, batch)


def test_every_greedy_token_is_the_argmax_given_the_tokens_before_it(tiny_vita, tiny_dims):
    tiny_vita.eval()
    answers = tiny_vita.generate(**_batch(tiny_dims), max_new_tokens=6, eos_token_id=[63], pad_token_id=PAD)
    assert all(len(a) == 6 for a in answers), answers  # no row met token 63 in this random model
    for row, answer in enumerate(answers):
        for k in range(len(answer)):
            single = _batch(tiny_dims, rows=(row,))
            extended = torch.tensor([PROMPTS[row] + answer[:k]])  # the prompt and the answer so far
            single.update(input_ids=extended, attention_mask=torch.ones_like(extended))
            assert _teacher_forced_next(tiny_vita, single) == [answer[k]], (row, k)


def test_greedy_is_deterministic(tiny_vita, tiny_dims):
    tiny_vita.eval()
    batch = _batch(tiny_dims)
    first = tiny_vita.generate(**batch, max_new_tokens=8, eos_token_id=63, pad_token_id=PAD)
    torch.manual_seed(123)  # greedy reads no random state
    second = tiny_vita.generate(**batch, max_new_tokens=8, eos_token_id=63, pad_token_id=PAD)
    assert first == second


def test_a_batch_answers_as_each_prompt_alone(tiny_vita, tiny_dims):
    tiny_vita.eval()
    together = tiny_vita.generate(**_batch(tiny_dims), max_new_tokens=8, eos_token_id=63, pad_token_id=PAD)
    alone = [tiny_vita.generate(**_batch(tiny_dims, rows=(r,)), max_new_tokens=8, eos_token_id=63,
                                pad_token_id=PAD)[0] for r in range(3)]
    assert together == alone


def test_answers_stop_at_a_stop_token_and_synced_runs_agree(tiny_vita, tiny_dims):
    tiny_vita.eval()
    batch = _batch(tiny_dims)
    free = tiny_vita.generate(**batch, max_new_tokens=6, eos_token_id=63, pad_token_id=PAD)
    stop = free[0][2]  # make row 0's third token a stop token
    stopped = tiny_vita.generate(**batch, max_new_tokens=6, eos_token_id=[63, stop], pad_token_id=PAD)
    assert stopped[0] == free[0][: free[0].index(stop) + 1]
    # synced: every row runs all 6 steps (no early stop), then is cut at its first stop token
    synced = tiny_vita.generate(**batch, max_new_tokens=6, eos_token_id=[63, stop], pad_token_id=PAD, synced=True)
    assert synced == stopped


def test_sampling_follows_the_seed(tiny_vita, tiny_dims):
    tiny_vita.eval()
    batch = _batch(tiny_dims)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(tiny_vita.generate(**batch, max_new_tokens=12, temperature=5.0, eos_token_id=63,
                                       pad_token_id=PAD))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # at temperature 5 over 64 tokens, 36 draws agreeing by chance is ~impossible


def test_training_mode_is_restored(tiny_vita, tiny_dims):
    tiny_vita.train()
    tiny_vita.generate(**_batch(tiny_dims, rows=(2,)), max_new_tokens=2, eos_token_id=63, pad_token_id=PAD)
    assert tiny_vita.training and tiny_vita.llm.training


def test_bad_arguments_are_refused(tiny_vita, tiny_dims):
    batch = _batch(tiny_dims)
    with pytest.raises(ValueError, match="max_new_tokens 0"):
        tiny_vita.generate(**batch, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature -1"):
        tiny_vita.generate(**batch, temperature=-1.0)
    batch.pop("images")
    with pytest.raises(ValueError, match="placeholder/feature mismatch.*'img'"):
        tiny_vita.generate(**batch, sample_ids=["img", "aud", "txt"])
