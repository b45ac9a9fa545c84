"""The llama3, nemo, mixtral_two and plain templates: exact token strings and supervised spans."""

import re

import pytest
import torch
from tiny_families import family_tokenizer

from vitacore.constants import AUDIO_TOKEN_INDEX, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vitacore.data.conversation import SYSTEM_PROMPTS, TEMPLATES, get_template, tokenize_conversation
from vitacore.data.dataset import Collator, Sample

LANG = SYSTEM_PROMPTS["lang"]
IMAGE = SYSTEM_PROMPTS["image"]
TWO_TURNS = [
    {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "It is red."},
    {"from": "human", "value": "<audio>\nAnd the shape?"}, {"from": "gpt", "value": "A circle."},
]


def render(tokenizer, ids):
    """Decoded text with media placeholders written back."""
    out, run = "", []
    for token in ids + [None]:
        if token is not None and token >= 0:
            run.append(token)
            continue
        out += tokenizer.decode(run, skip_special_tokens=False)
        run = []
        out += {IMAGE_TOKEN_INDEX: "<image>", AUDIO_TOKEN_INDEX: "<audio>", None: ""}[token]
    return out


def supervised(tokenizer, ids, labels):
    """Each run of supervised positions, decoded; labels equal the ids there."""
    spans, current = [], []
    for token, label in zip(ids + [0], labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    return spans


@pytest.mark.parametrize("version, family, text, answers", [
    ("llama3", "llama",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + LANG + "<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nWhat colour is it?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n☜It is red.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\n<audio>\nAnd the shape?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n☞A circle.<|eot_id|>",
     ["☜It is red.<|eot_id|>", "☞A circle.<|eot_id|>"]),
    ("nemo", "mistral",
     "<s>[INST]" + LANG + "\n\nWhat colour is it?[/INST]☜It is red.</s>"
     "[INST]<audio>\nAnd the shape?[/INST]☞A circle.</s>",
     ["☜It is red.</s>", "☞A circle.</s>"]),
    ("mixtral_two", "mixtral",
     "<s>system:" + LANG + "</s>\nuser:What colour is it?</s>\nbot:☜It is red.</s>"
     "\nuser:<audio>\nAnd the shape?</s>\nbot:☞A circle.</s>",
     ["☜It is red.</s>", "☞A circle.</s>"]),
    ("qwen2p5_instruct", "qwen2",
     "<|im_start|>system\n" + LANG + "<|im_end|>\n<|im_start|>user\nWhat colour is it?<|im_end|>\n"
     "<|im_start|>assistant\n☜It is red.<|im_end|>\n<|im_start|>user\n<audio>\nAnd the shape?<|im_end|>\n"
     "<|im_start|>assistant\n☞A circle.<|im_end|>",
     ["☜It is red.<|im_end|>", "☞A circle.<|im_end|>"]),
])
def test_chat_templates_exact_text_and_supervision(version, family, text, answers):
    tokenizer = family_tokenizer(family)
    ids, labels = tokenize_conversation(TWO_TURNS, tokenizer, get_template(version), "lang")
    assert render(tokenizer, ids) == text
    assert supervised(tokenizer, ids, labels) == answers
    end = get_template(version).answer_end
    if end.startswith("<"):  # the end-of-turn is one special token of that family's tokenizer
        assert len(tokenizer.encode(end, add_special_tokens=False)) == 1


def test_bos_is_the_tokenizers_and_is_masked():
    tokenizer = family_tokenizer("mistral")
    ids, labels = tokenize_conversation(TWO_TURNS[:2], tokenizer, get_template("nemo"), "lang")
    assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    qwen = family_tokenizer("qwen2")  # no BOS token: nothing is added
    ids, _ = tokenize_conversation(TWO_TURNS[:2], qwen, get_template("llama3"), "lang")
    assert render(qwen, ids).startswith("<|start_header_id|>")


def test_nemo_puts_the_modality_prompt_in_the_first_user_turn_only():
    tokenizer = family_tokenizer("mistral")
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}] + TWO_TURNS[:2]
    ids, _ = tokenize_conversation(turns, tokenizer, get_template("nemo"), "image")
    assert render(tokenizer, ids) == (f"<s>[INST]{IMAGE}\n\n<image>\nWhat is it?[/INST]☜A cat.</s>"
                                      "[INST]What colour is it?[/INST]☜It is red.</s>")


def test_inserted_turn_gets_its_state_token_in_every_chat_template():
    for version, family in (("llama3", "llama"), ("nemo", "mistral"), ("mixtral_two", "mixtral")):
        tokenizer = family_tokenizer(family)
        ids, labels = tokenize_conversation(TWO_TURNS, tokenizer, get_template(version), "lang", inserted_id=3)
        assert supervised(tokenizer, ids, labels)[1].startswith("☟A circle.")


def test_plain_keeps_the_media_and_the_answer():
    tokenizer = family_tokenizer("mistral")
    turns = [{"from": "human", "value": "<image><image>\nDescribe the picture.<audio>"},
             {"from": "gpt", "value": "a red circle"}]
    ids, labels = tokenize_conversation(turns, tokenizer, get_template("plain"), "image")
    assert ids[:4] == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, AUDIO_TOKEN_INDEX]
    assert render(tokenizer, ids) == "<s><image><image><audio>a red circle\n"
    assert supervised(tokenizer, ids, labels) == ["a red circle\n"]  # no state token, no eos


def test_plain_refuses_multi_turn_samples():
    with pytest.raises(ValueError, match="--version plain takes exactly one human / gpt exchange.*4 turns"):
        tokenize_conversation(TWO_TURNS, family_tokenizer("qwen2"), get_template("plain"), "lang")


def test_all_issue_templates_are_known():
    assert {"qwen2p5_instruct", "llama3", "nemo", "mixtral_two", "plain"} <= set(TEMPLATES)


def test_pad_equal_to_eos_keeps_the_answers_eos_supervised_and_attended():
    tokenizer = family_tokenizer("llama")
    tokenizer.pad_token = tokenizer.eos_token  # llama3-8b's rule
    eos = tokenizer.eos_token_id
    long_ids, long_labels = tokenize_conversation(TWO_TURNS, tokenizer, get_template("llama3"), "lang")
    short_ids, short_labels = tokenize_conversation(TWO_TURNS[:2], tokenizer, get_template("llama3"), "lang")
    assert short_ids[-1] == eos and short_labels[-1] == eos
    batch = Collator(tokenizer.pad_token_id)([Sample("a", long_ids, long_labels, [], [], [], "lang"),
                                              Sample("b", short_ids, short_labels, [], [], [], "lang")])
    n = len(short_ids)
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (len(long_ids) - n)
    assert batch["labels"][1, n - 1] == eos and (batch["labels"][1, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, n:] == eos).all()  # padded with eos, yet masked by length
    assert batch["attention_mask"][0].all() and torch.equal(batch["labels"][0], torch.tensor(long_labels))


def test_system_prompts_from_yaml_replace_the_templates_by_modality(tmp_path):
    from vitacore.data.conversation import get_template, load_system_prompts, with_system_prompts

    path = tmp_path / "prompts.yaml"
    path.write_text("image: Look closely at the picture.\nlang: Be brief.\n")
    base = get_template("qwen2p5_instruct")
    template = with_system_prompts(base, load_system_prompts(str(path)))
    assert template.system_prompts["image"] == "Look closely at the picture."
    assert template.system_prompts["lang"] == "Be brief."
    assert template.system_prompts["video"] == base.system_prompts["video"]  # left out: the template's
    assert base.system_prompts["lang"] != "Be brief."  # the registered template is unchanged


@pytest.mark.parametrize("text, message", [
    ("audio: hi\n", "unknown modality 'audio'"),
    ("image: [1, 2]\n", "the 'image' prompt must be text"),
    ("- a list\n", "expected a mapping"),
    ("image: [unclosed\n", "not valid YAML"),
])
def test_bad_system_prompt_files_name_the_file_and_the_problem(tmp_path, text, message):
    from vitacore.data.conversation import load_system_prompts

    path = tmp_path / "prompts.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_system_prompts(str(path))
    assert str(path) in str(err.value)
