"""Tests for vitacore.data.conversation: templates, state tokens and label masking."""

from dataclasses import replace

import pytest

from vitacore.constants import AUDIO_TOKEN_INDEX, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vitacore.data.conversation import (
    QWEN2P5_INSTRUCT,
    STATE_AUDIO_QUERY,
    STATE_INSERTED,
    STATE_TEXT_QUERY,
    TEMPLATES,
    get_template,
    tokenize_conversation,
)
from vitacore.demo.tokenizer import build_tokenizer

END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _turns(*pairs):
    out = []
    for question, answer in pairs:
        out += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return out


def _spans(labels):
    """Contiguous runs of supervised positions as (start, end)."""
    spans, start = [], None
    for i, lab in enumerate(labels + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def _expected_text(system, pairs, states):
    text = f"<|im_start|>system\n{system}{END}\n"
    for (question, answer), state in zip(pairs, states):
        text += f"<|im_start|>user\n{question}{END}\n<|im_start|>assistant\n{state}{answer}{END}\n"
    return text[:-1]  # VITA's prompt ends at the last <|im_end|>: no newline after it


def test_full_sequence_follows_chatml_layout(tok):
    pairs = [("What colour is it?", "It is red."), ("And the shape?", "A circle.")]
    ids, labels = tokenize_conversation(_turns(*pairs), tok, QWEN2P5_INSTRUCT, "lang")
    assert len(ids) == len(labels)
    expected = _expected_text(QWEN2P5_INSTRUCT.system_prompts["lang"], pairs, [STATE_TEXT_QUERY] * 2)
    assert _decode(tok, ids) == expected


def test_only_assistant_answers_are_supervised(tok):
    pairs = [("What colour is it?", "It is red."), ("And the shape?", "A circle.")]
    ids, labels = tokenize_conversation(_turns(*pairs), tok, QWEN2P5_INSTRUCT, "lang")
    spans = _spans(labels)
    assert len(spans) == 2
    for (start, end), (_, answer) in zip(spans, pairs):
        assert labels[start:end] == ids[start:end]
        assert _decode(tok, labels[start:end]) == f"{STATE_TEXT_QUERY}{answer}{END}"
    # everything outside the spans is ignored, and the spans end exactly on <|im_end|>
    covered = {i for s, e in spans for i in range(s, e)}
    assert all(labels[i] == IGNORE_INDEX for i in range(len(labels)) if i not in covered)
    im_end = tok.convert_tokens_to_ids(END)
    assert all(ids[e - 1] == im_end for _, e in spans)
    # the newline after <|im_end|> is not supervised
    assert all(labels[e] == IGNORE_INDEX for _, e in spans if e < len(labels))


def test_state_token_after_audio_query_is_audio_state(tok):
    conv = _turns(("<audio>\nWhat do you hear?", "a low tone"))
    ids, labels = tokenize_conversation(conv, tok, QWEN2P5_INSTRUCT, "lang")
    ((start, end),) = _spans(labels)
    assert labels[start] == tok.convert_tokens_to_ids(STATE_AUDIO_QUERY)
    assert _decode(tok, labels[start:end]) == f"{STATE_AUDIO_QUERY}a low tone{END}"


def test_state_token_follows_the_previous_query_per_turn(tok):
    conv = _turns(("hello", "hi"), ("<audio>", "heard"), ("bye", "ok"))
    ids, labels = tokenize_conversation(conv, tok, QWEN2P5_INSTRUCT, "lang")
    firsts = [labels[s] for s, _ in _spans(labels)]
    expected = [STATE_TEXT_QUERY, STATE_AUDIO_QUERY, STATE_TEXT_QUERY]
    assert firsts == [tok.convert_tokens_to_ids(t) for t in expected]


def test_inserted_turn_gets_inserted_state(tok):
    conv = _turns(("<image>\nWhat is shown?", "a red circle"), ("<audio>", ""))
    ids, labels = tokenize_conversation(conv, tok, QWEN2P5_INSTRUCT, "image", inserted_id=3)
    spans = _spans(labels)
    assert [_decode(tok, labels[s:e]) for s, e in spans] == [
        f"{STATE_TEXT_QUERY}a red circle{END}",
        f"{STATE_INSERTED}{END}",
    ]


def test_inserted_id_on_another_turn_leaves_this_one_alone(tok):
    conv = _turns(("q1", "a1"), ("q2", "a2"))
    _, labels = tokenize_conversation(conv, tok, QWEN2P5_INSTRUCT, "lang", inserted_id=1)
    firsts = [labels[s] for s, _ in _spans(labels)]
    assert firsts == [tok.convert_tokens_to_ids(STATE_INSERTED), tok.convert_tokens_to_ids(STATE_TEXT_QUERY)]


def test_template_without_state_tokens_has_none(tok):
    template = replace(QWEN2P5_INSTRUCT, use_state_tokens=False)
    conv = _turns(("<audio>", "a high tone"))
    ids, labels = tokenize_conversation(conv, tok, template, "lang", inserted_id=1)
    ((start, end),) = _spans(labels)
    assert _decode(tok, labels[start:end]) == f"a high tone{END}"
    state_ids = {tok.convert_tokens_to_ids(t) for t in (STATE_AUDIO_QUERY, STATE_TEXT_QUERY, STATE_INSERTED)}
    assert not state_ids & set(ids)


def test_placeholders_become_media_ids_and_are_never_supervised(tok):
    conv = _turns(("<image>\n<image>\nCompare. <audio>", "same"), ("<audio><image>", "different"))
    ids, labels = tokenize_conversation(conv, tok, QWEN2P5_INSTRUCT, "image")
    assert ids.count(IMAGE_TOKEN_INDEX) == 3
    assert ids.count(AUDIO_TOKEN_INDEX) == 2
    assert IMAGE_TOKEN_INDEX not in labels and AUDIO_TOKEN_INDEX not in labels
    # placeholders appear in the order written
    media = [i for i in ids if i < 0]
    assert media == [IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, AUDIO_TOKEN_INDEX, AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX]
    # no other negative ids, and the text around the placeholders is intact
    text = _decode(tok, [i for i in ids if i >= 0])
    assert "Compare. " in text and "<image>" not in text and "<audio>" not in text


def test_placeholder_splits_text_exactly(tok):
    conv = _turns(("look<image>here", "ok"))
    ids, _ = tokenize_conversation(conv, tok, QWEN2P5_INSTRUCT, "image")
    pos = ids.index(IMAGE_TOKEN_INDEX)
    before = tok.encode("<|im_start|>user\nlook", add_special_tokens=False)
    after = tok.encode(f"here{END}\n", add_special_tokens=False)
    assert ids[pos - len(before): pos] == before
    assert ids[pos + 1: pos + 1 + len(after)] == after


@pytest.mark.parametrize("roles,bad_index", [
    (["gpt", "human"], 0),
    (["human", "human"], 1),
    (["human", "gpt", "gpt"], 2),
    (["human", "gpt", "human", "system"], 3),
])
def test_roles_must_alternate(tok, roles, bad_index):
    conv = [{"from": role, "value": "x"} for role in roles]
    with pytest.raises(ValueError) as err:
        tokenize_conversation(conv, tok, QWEN2P5_INSTRUCT, "lang")
    assert f"conversations[{bad_index}]" in str(err.value)


def test_system_prompt_depends_on_modality(tok):
    conv = _turns(("q", "a"))
    decoded = {}
    for modality in ("image", "video", "lang"):
        ids, _ = tokenize_conversation(conv, tok, QWEN2P5_INSTRUCT, modality)
        decoded[modality] = _decode(tok, ids)
        assert decoded[modality].startswith(f"<|im_start|>system\n{QWEN2P5_INSTRUCT.system_prompts[modality]}{END}")
    assert len(set(decoded.values())) == 3
    # unknown modality falls back to the language prompt
    ids, _ = tokenize_conversation(conv, tok, QWEN2P5_INSTRUCT, "smell")
    assert _decode(tok, ids) == decoded["lang"]


def test_get_template_default_and_known_names():
    assert get_template(None) is QWEN2P5_INSTRUCT
    for name in TEMPLATES:
        assert get_template(name) is TEMPLATES[name]


def test_unknown_version_lists_known_templates():
    with pytest.raises(ValueError) as err:
        get_template("llama_3")
    message = str(err.value)
    assert "--version" in message and "'llama_3'" in message
    for name in TEMPLATES:
        assert name in message


def test_audio_query_forces_the_state_token():
    from vitacore.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    template = get_template("qwen2p5_instruct")
    conversation = [{"from": "human", "value": "high tone\nWhat do you hear?"}, {"from": "gpt", "value": "a high tone"}]
    for forced, state in ((True, "☞"), (None, "☜"), (False, "☜")):
        ids, labels = tokenize_conversation(conversation, tokenizer, template, "lang", audio_query=forced)
        supervised = tokenizer.decode([t for t in labels if t != -100])
        assert supervised.startswith(state + "a high tone"), (forced, supervised)
