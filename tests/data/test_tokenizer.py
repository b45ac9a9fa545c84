"""Tests for the locally trained byte-level BPE tokenizer."""

import json

import pytest

from vitacore.demo.tokenizer import (
    CHAT_SPECIAL_TOKENS,
    DEFAULT_CORPUS_PATH,
    MEDIA_PLACEHOLDERS,
    STATE_TOKENS,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
)

SAMPLES = [
    "What is shown in the picture? A red circle on the left.",
    "Describe the video: a purple triangle is moving up, frame by frame.",
    "A low hum, then a high beep and a whistle at 1000 Hz.",
    "<|im_start|>user\n<image>\nWhat colour is the square?<|im_end|>\n",
    "<|im_start|>assistant\n☜The square is green.<|im_end|><|endoftext|>",
    "☞I hear a middle tone.☟",
    "Numbers 0123456789, punctuation: !?;:()[]{}\"'-_/\\@#$%^&*+=~`|",
]

ROUND_TRIP = [
    "",
    " ",
    "plain ascii text with  double  spaces\tand\ttabs\nand\r\nnewlines",
    "  leading and trailing spaces  ",
    "café naïve résumé Zürich Ærø Kraków",
    "你好，世界。これは日本語です。안녕하세요",
    "emoji 🙂🎨🔴🟦 and a family 👨‍👩‍👧 and a flag 🇳🇴",
    "state tokens ☞ ☜ ☟ inside☞text☜too☟",
    "control \x00\x01\x7f and rare \u2028 separators \ufeff",
    "mixed <|im_start|>special<|im_end|> and <image> <video> <audio> placeholders",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _vocab_and_merges(t):
    model = json.loads(t.backend_tokenizer.to_str())["model"]
    return model["vocab"], model["merges"]


def test_build_is_deterministic():
    a = build_tokenizer()
    b = build_tokenizer()
    assert _vocab_and_merges(a) == _vocab_and_merges(b)
    assert a.get_vocab() == b.get_vocab()
    for s in SAMPLES + ROUND_TRIP:
        assert a.encode(s, add_special_tokens=False) == b.encode(s, add_special_tokens=False)


def test_vocab_size_bound():
    for requested in (300, 512, 1024):
        t = build_tokenizer(vocab_size=requested)
        vocab, _ = _vocab_and_merges(t)
        assert len(vocab) <= requested
        assert len(t) <= requested + len(STATE_TOKENS)


def test_vocab_too_small_raises():
    with pytest.raises(ValueError, match="too small"):
        build_tokenizer(vocab_size=100)


def test_custom_corpus(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("red circle blue square\n" * 50 + "green triangle\n" * 30, encoding="utf-8")
    t = build_tokenizer(vocab_size=300, corpus_path=str(corpus))
    assert t.decode(t.encode("red circle", add_special_tokens=False)) == "red circle"
    # The default corpus yields a different (larger) vocabulary.
    assert len(t) < len(build_tokenizer())


def test_missing_corpus_raises(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        build_tokenizer(corpus_path=str(missing))


def test_default_corpus_is_bundled_and_sized():
    with open(DEFAULT_CORPUS_PATH, encoding="utf-8") as f:
        text = f.read()
    assert 20_000 <= len(text.encode("utf-8")) <= 40_000
    for word in ("purple", "triangle", "whistle", "describe", "heard", "video"):
        assert word in text


@pytest.mark.parametrize("text", ROUND_TRIP + SAMPLES)
def test_round_trip_exact(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_common_words_are_compact(tok):
    # Frequent corpus words should have been merged into few tokens.
    for word in (" picture", " circle", " triangle", " audio", " video"):
        assert len(tok.encode(word, add_special_tokens=False)) <= 2, word


def test_special_tokens(tok):
    assert tok.pad_token == "<|endoftext|>"
    assert tok.eos_token == "<|im_end|>"
    assert tok.bos_token is None
    assert tok.unk_token is None
    assert tok.padding_side == "right"
    assert tok.model_max_length == 2048
    ids = [tok.convert_tokens_to_ids(t) for t in CHAT_SPECIAL_TOKENS]
    assert ids == [0, 1, 2]
    assert tok.pad_token_id == ids[0]
    assert tok.eos_token_id == ids[2]
    for t, i in zip(CHAT_SPECIAL_TOKENS, ids):
        assert tok.encode(t, add_special_tokens=False) == [i]
        assert t in tok.all_special_tokens
    # Never split, even glued to other text.
    ids = tok.encode("x<|im_start|>y<|im_end|>z", add_special_tokens=False)
    assert 1 in ids and 2 in ids


def test_no_automatic_bos_eos(tok):
    assert tok("hello")["input_ids"] == tok.encode("hello", add_special_tokens=False)


def test_state_tokens_single_ids_not_special(tok):
    assert set(STATE_TOKENS) == {"audio_query", "text_query", "inserted"}
    assert STATE_TOKENS == {"audio_query": "☞", "text_query": "☜", "inserted": "☟"}
    seen = set()
    for t in STATE_TOKENS.values():
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1
        seen.add(ids[0])
        assert t not in tok.all_special_tokens
        # Single id also when glued to surrounding text.
        assert ids[0] in tok.encode(f"ab{t}cd", add_special_tokens=False)
    assert len(seen) == 3
    text = "<|im_start|>assistant\n☞A red star.<|im_end|>"
    decoded = tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True)
    assert decoded == "assistant\n☞A red star."


def test_media_placeholders_are_not_tokens(tok):
    vocab = tok.get_vocab()
    for p in MEDIA_PLACEHOLDERS:
        assert p not in vocab
        assert len(tok.encode(p, add_special_tokens=False)) > 1


def test_padding_right(tok):
    batch = tok(["a red circle", "a"], padding=True)
    short = batch["input_ids"][1]
    assert short[-1] == tok.pad_token_id
    assert batch["attention_mask"][1][-1] == 0


def test_save_load_preserves_behaviour(tok, tmp_path):
    out = save_tokenizer(tok, tmp_path / "tok")
    loaded = load_tokenizer(out)
    for s in SAMPLES + ROUND_TRIP:
        assert loaded.encode(s, add_special_tokens=False) == tok.encode(s, add_special_tokens=False)
        assert loaded(s)["input_ids"] == tok(s)["input_ids"]
    assert loaded.get_vocab() == tok.get_vocab()
    assert len(loaded) == len(tok)
    assert loaded.pad_token == tok.pad_token and loaded.pad_token_id == tok.pad_token_id
    assert loaded.eos_token == tok.eos_token and loaded.eos_token_id == tok.eos_token_id
    assert loaded.bos_token is None and loaded.unk_token is None
    assert sorted(loaded.all_special_tokens) == sorted(tok.all_special_tokens)
    assert loaded.padding_side == "right"
    assert loaded.model_max_length == tok.model_max_length


def test_load_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "empty")
