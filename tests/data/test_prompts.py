"""Tests for vitacore.data.prompts: prompt-only samples equal training's ids before the answer."""

import pytest
import torch
from PIL import Image

from vitacore.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vitacore.data.conversation import PLAIN, QWEN2P5_INSTRUCT, STATE_AUDIO_QUERY, STATE_TEXT_QUERY
from vitacore.data.dataset import VitaJsonDataset
from vitacore.data.images import ImageTransform
from vitacore.data.prompts import (
    PromptCollator,
    PromptDataset,
    answer_text,
    question_record,
    stop_token_ids,
)
from vitacore.demo.tokenizer import build_tokenizer

MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _conv(*pairs):
    turns = []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def _dataset(records, tok, template=QWEN2P5_INSTRUCT, root=".", **kwargs):
    transform = ImageTransform(16, MEAN, STD)
    return VitaJsonDataset(records, str(root), tok, template, transform, None, **kwargs)


def test_prompt_is_the_training_ids_before_the_last_answer(tok):
    record = {"id": "r", "conversations": _conv(("What colour?", "red"), ("And the shape?", "a circle"))}
    base = _dataset([record], tok)
    training = base[0]
    prompt = PromptDataset(base)[0]
    n = len(prompt.input_ids)
    assert training.input_ids[:n] == prompt.input_ids
    assert set(prompt.labels) == {IGNORE_INDEX}
    # What follows the prompt is exactly the last supervised run: state token, answer, end of turn.
    assert tok.decode(training.input_ids[n:]) == f"{STATE_TEXT_QUERY}a circle<|im_end|>"
    assert all(label != IGNORE_INDEX for label in training.labels[n:])
    # The prompt ends with the assistant's opening and keeps the first exchange, its answer included.
    assert tok.decode(prompt.input_ids).endswith("And the shape?<|im_end|>\n<|im_start|>assistant\n")
    assert f"{STATE_TEXT_QUERY}red<|im_end|>" in tok.decode(prompt.input_ids)
    assert prompt.reference == "a circle"


def test_a_question_without_answer_gives_the_same_prompt_as_a_record(tok, tmp_path):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "a.png")
    trained = {"id": "t", "image": "a.png", "conversations": _conv(("<image>\nWhat is shown?", "a red square"))}
    asked = question_record("What is shown?", images=["a.png"])
    assert asked["conversations"][0]["value"] == "<image>\nWhat is shown?"
    prompts = PromptDataset(_dataset([trained, asked], tok, root=tmp_path))
    assert prompts[0].input_ids == prompts[1].input_ids
    assert prompts[0].input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert torch.equal(prompts[0].images[0], prompts[1].images[0])
    assert (prompts[0].reference, prompts[1].reference) == ("a red square", "")


def test_a_template_without_state_tokens_cuts_before_the_answer(tok):
    record = {"id": "p", "conversations": _conv(("Describe it", "a blue circle"))}
    base = _dataset([record], tok, template=PLAIN)
    training, prompt = base[0], PromptDataset(base)[0]
    n = len(prompt.input_ids)
    assert training.input_ids[:n] == prompt.input_ids
    assert tok.decode(training.input_ids[n:]) == "a blue circle\n"


def test_the_reference_follows_a_replaced_bad_record(tok, tmp_path):
    Image.new("RGB", (16, 16), (20, 200, 30)).save(tmp_path / "ok.png")
    records = [{"id": "bad", "image": "missing.png", "conversations": _conv(("<image>\nWhat?", "a lost square"))},
               {"id": "good", "image": "ok.png", "conversations": _conv(("<image>\nWhat?", "a green circle"))}]
    prompts = PromptDataset(_dataset(records, tok, root=tmp_path, on_bad_sample="skip"))
    first = prompts[0]
    assert first.sample_id == "good" and first.replaced_from is not None
    assert first.reference == "a green circle"


def test_answer_text_drops_the_state_token_and_what_follows_the_end_of_turn(tok):
    ids = tok.encode(f"{STATE_AUDIO_QUERY}a middle tone<|im_end|>\nmore", add_special_tokens=False)
    assert answer_text(ids, tok, QWEN2P5_INSTRUCT) == "a middle tone"
    plain_ids = tok.encode(" a red  circle ", add_special_tokens=False)
    assert answer_text(plain_ids, tok, QWEN2P5_INSTRUCT) == "a red  circle"
    end = tok.encode("<|im_end|>", add_special_tokens=False)
    assert len(end) == 1 and end[0] in stop_token_ids(tok, QWEN2P5_INSTRUCT)


def test_collated_prompts_carry_inputs_and_references_but_no_labels(tok, tmp_path):
    Image.new("RGB", (16, 16), (20, 20, 200)).save(tmp_path / "b.png")
    records = [{"id": "i", "image": "b.png", "conversations": _conv(("<image>\nWhat?", "a blue square"))},
               {"id": "t", "conversations": _conv(("Say hi", "hi"))}]
    prompts = PromptDataset(_dataset(records, tok, root=tmp_path))
    batch = PromptCollator(tok.pad_token_id)([prompts[0], prompts[1]])
    assert set(batch) == {"input_ids", "attention_mask", "images", "sample_ids", "references"}
    assert batch["references"] == ["a blue square", "hi"]
    assert batch["images"].shape == (1, 3, 16, 16)
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(prompts[0].input_ids), len(prompts[1].input_ids)]


def test_question_records_place_media_and_check_counts():
    record = question_record("Compare them", images=["a.png", "b.png"], audios=["c.wav"], video="d.gif")
    assert record["conversations"][0]["value"] == "<image>\n<image>\n<video>\n<audio>\nCompare them"
    assert record["conversations"][1] == {"from": "gpt", "value": ""}
    assert question_record("First <image> then", images=["a.png"])["conversations"][0]["value"] == "First <image> then"
    with pytest.raises(ValueError, match="--image"):
        question_record("Look: <image>", images=["a.png", "b.png"])
