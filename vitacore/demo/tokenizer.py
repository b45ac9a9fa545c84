"""A small byte-level BPE tokenizer trained locally from a bundled corpus.

The library ships an embedded tiny default model that must work with no
network and no model hub, so its tokenizer is trained on the spot from
``corpus.txt`` (beside this file). Training is deterministic: the same corpus and vocab
size always give the same vocabulary, merges and ids.

Byte-level BPE with the full 256-symbol byte alphabet means any UTF-8 string
can be encoded and decoded back exactly, even text (CJK, emoji) that never
appeared in the corpus; rare text just costs more tokens.

Token layout:

* ``<|endoftext|>`` (padding), ``<|im_start|>`` and ``<|im_end|>`` (end of
  sequence) are special tokens: never split, skippable when decoding.
* VITA-1.5's state tokens ``☞``, ``☜`` and ``☟`` are added as ordinary (not
  special) tokens so each is a single id yet stays in decoded answers.
* The media placeholders ``<image>``, ``<video>`` and ``<audio>`` are
  deliberately *not* tokens: the data pipeline splits prompt text on them and
  splices media embeddings in their place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = [
    "PAD_TOKEN",
    "IM_START_TOKEN",
    "IM_END_TOKEN",
    "CHAT_SPECIAL_TOKENS",
    "STATE_TOKENS",
    "MEDIA_PLACEHOLDERS",
    "DEFAULT_CORPUS_PATH",
    "DEFAULT_VOCAB_SIZE",
    "DEFAULT_MODEL_MAX_LENGTH",
    "build_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
]

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"

#: Special tokens of the chat format, in id order (ids 0, 1, 2).
CHAT_SPECIAL_TOKENS = [PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN]

#: VITA-1.5 state tokens: ☞ starts an answer to an audio query, ☜ an answer
#: to a text query, and ☟ marks an inserted (noisy, not-to-be-answered) turn.
STATE_TOKENS = {"audio_query": "☞", "text_query": "☜", "inserted": "☟"}

#: Placeholders the data pipeline splits on; they must never become tokens.
MEDIA_PLACEHOLDERS = ("<image>", "<video>", "<audio>")

DEFAULT_CORPUS_PATH = str(Path(__file__).resolve().parent / "corpus.txt")
DEFAULT_VOCAB_SIZE = 1024
DEFAULT_MODEL_MAX_LENGTH = 2048

PathLike = Union[str, "os.PathLike[str]"]


def _read_corpus(corpus_path: PathLike) -> list[str]:
    """Reads the corpus as a list of non-empty lines.

    Lines are fed to the trainer from an in-memory list rather than through
    ``train(files=...)`` so the input order is fixed and no file-chunking
    behaviour of the Rust reader can influence the result.
    """
    path = Path(corpus_path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer corpus not found: {path}")
    text = path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"tokenizer corpus is empty: {path}")
    return lines


def build_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE, corpus_path: Optional[str] = None
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on the bundled (or a given) corpus.

    Args:
        vocab_size: Target size of the trained vocabulary, including the
            256 byte symbols and the three chat special tokens. The three
            state tokens are added on top, so ``len(tokenizer)`` is at most
            ``vocab_size + 3``. The trainer may stop short of the target
            when the corpus runs out of pairs to merge.
        corpus_path: UTF-8 text file to train on. Defaults to the corpus
            shipped in ``vitacore/demo/corpus.txt``.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``pad_token="<|endoftext|>"``,
        ``eos_token="<|im_end|>"``, no BOS/UNK token, right padding and
        ``model_max_length=2048``.

    Raises:
        ValueError: If ``vocab_size`` is too small to hold the byte alphabet
            and the special tokens, or the corpus is empty.
        FileNotFoundError: If ``corpus_path`` does not exist.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(alphabet) + len(CHAT_SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the byte alphabet and chat "
            f"special tokens alone need {minimum} entries"
        )
    lines = _read_corpus(corpus_path or DEFAULT_CORPUS_PATH)

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps "Hello" and " Hello" distinct, as GPT-2 /
    # Qwen do; use_regex splits words, digits and punctuation before merging,
    # which is also why "<image>" can never be learned as a single token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        # Special tokens passed here get the first ids (0, 1, 2) in order.
        special_tokens=list(CHAT_SPECIAL_TOKENS),
        # Seeding the full byte alphabet guarantees every byte has an id, so
        # unseen characters still encode (as bytes) and decode exactly.
        initial_alphabet=alphabet,
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))

    # The trainer only registered the chat tokens in the vocab; registering
    # them as added special tokens makes the encoder match them whole before
    # pre-tokenization instead of splitting "<|im_end|>" into pieces.
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIAL_TOKENS]
    )
    # State tokens are plain text in answers (not skipped when decoding with
    # skip_special_tokens=True) but must each be one id.
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False, single_word=False)
            for t in STATE_TOKENS.values()
        ]
    )

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END_TOKEN,
        bos_token=None,
        unk_token=None,
        padding_side="right",
        model_max_length=DEFAULT_MODEL_MAX_LENGTH,
        # No BOS/EOS is inserted automatically: the chat formatter writes
        # <|im_start|>/<|im_end|> itself.
        clean_up_tokenization_spaces=False,
    )
    # <|im_start|> has no named role (bos/eos/pad), so list it as an extra
    # special token; this keeps it in all_special_tokens/all_special_ids and
    # in the saved config. The dict key is the spelling both transformers 4.x
    # and 5.x accept; the token already exists, so no id is created.
    hf_tok.add_special_tokens({"additional_special_tokens": [IM_START_TOKEN]})
    return hf_tok


def save_tokenizer(tok: PreTrainedTokenizerFast, directory: PathLike) -> str:
    """Saves a tokenizer so that :func:`load_tokenizer` can restore it offline.

    Args:
        tok: The tokenizer to save.
        directory: Target directory; created if missing.

    Returns:
        The directory path as a string.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tok.save_pretrained(directory)
    return directory


def load_tokenizer(directory: PathLike) -> PreTrainedTokenizerFast:
    """Loads a tokenizer saved by :func:`save_tokenizer`, without network access.

    Args:
        directory: Directory written by :func:`save_tokenizer` (or any
            ``save_pretrained`` output containing ``tokenizer.json``).

    Returns:
        The restored tokenizer; it produces the same ids and has the same
        special tokens as the saved one.

    Raises:
        FileNotFoundError: If ``directory`` has no ``tokenizer.json``.
    """
    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {directory!r}")
    # local_files_only stops transformers from ever trying the hub, even if
    # the directory name happens to look like a repo id.
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)
