"""Conversation templates and tokenization with label masking.

Token ids are assembled piece by piece (system, user turns, assistant turns), so the labels line up
with the ids by construction: VITA's "tokenization mismatch, zero the sample" failure mode cannot
happen here. Templates (``--version``): ``qwen2p5_instruct`` (VITA's Qwen2.5 ChatML), ``llama3``,
``nemo``, ``mixtral_two`` and ``plain``; each names its end-of-turn text as the real tokenizers spell
it, so it is one token there.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from vitacore.constants import (
    AUDIO_TOKEN_INDEX,
    DEFAULT_AUDIO_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)

STATE_AUDIO_QUERY = "☞"
STATE_TEXT_QUERY = "☜"
STATE_INSERTED = "☟"

_PLACEHOLDER = re.compile(f"({re.escape(DEFAULT_IMAGE_TOKEN)}|{re.escape(DEFAULT_AUDIO_TOKEN)})")


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format, as the text pieces a conversation is assembled from.

    ``{system}`` and ``{text}`` in the pieces stand for the system prompt and a user turn's text.
    Only the answer, its state token and ``answer_end`` are supervised; every other piece is masked.

    Attributes:
        name: the ``--version`` key.
        system_prompts: one system prompt per modality (``image``, ``video``, ``lang``).
        use_state_tokens: prefix answers with VITA-1.5's state tokens.
        system: the system block at the start ("" when the system prompt goes into the first user turn).
        user: a user turn.
        first_user: the first user turn when it differs from ``user`` (it carries the system prompt).
        assistant: what opens an assistant turn.
        answer_end: the end-of-turn text after each answer (supervised).
        after_answer: text between an answer's end and the next turn.
        add_bos: start with the tokenizer's BOS token, when it has one.
        media_only_user: keep only the media placeholders of the user turn (LLaVA's ``plain``).
        single_turn: exactly one user / assistant exchange per sample.
    """

    name: str
    system_prompts: dict = field(default_factory=dict)
    use_state_tokens: bool = True
    system: str = "<|im_start|>system\n{system}<|im_end|>\n"
    user: str = "<|im_start|>user\n{text}<|im_end|>\n"
    first_user: Optional[str] = None
    assistant: str = "<|im_start|>assistant\n"
    answer_end: str = "<|im_end|>"
    after_answer: str = "\n"
    add_bos: bool = False
    media_only_user: bool = False
    single_turn: bool = False


# Our own wording; the image and video prompts ask for answers grounded in the media, as VITA's do.
SYSTEM_PROMPTS = {
    "image": "You are a helpful multimodal assistant. Answer from what the image shows.",
    "video": "You are a helpful multimodal assistant. Answer from what the video shows.",
    "lang": "You are a helpful multimodal assistant.",
}

# VITA's Qwen2.5 format (ChatML).
QWEN2P5_INSTRUCT = ChatTemplate(name="qwen2p5_instruct", system_prompts=SYSTEM_PROMPTS)

# Llama 3 Instruct's header format (VITA's llama3-8b type has no template of its own).
LLAMA3 = ChatTemplate(
    name="llama3", system_prompts=SYSTEM_PROMPTS, add_bos=True,
    system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>",
    assistant="<|start_header_id|>assistant<|end_header_id|>\n\n", answer_end="<|eot_id|>", after_answer="",
)

# VITA's nemo (Mistral NeMo): [INST]...[/INST] answer</s>; the system prompt opens the first user turn.
NEMO = ChatTemplate(
    name="nemo", system_prompts=SYSTEM_PROMPTS, add_bos=True, system="",
    first_user="[INST]{system}\n\n{text}[/INST]", user="[INST]{text}[/INST]",
    assistant="", answer_end="</s>", after_answer="",
)

# VITA's mixtral_two: "system:" prompt, then "user:" / "bot:" turns, each closed by </s>.
MIXTRAL_TWO = ChatTemplate(
    name="mixtral_two", system_prompts=SYSTEM_PROMPTS, add_bos=True,
    system="system:{system}</s>", user="\nuser:{text}</s>",
    assistant="\nbot:", answer_end="</s>", after_answer="",
)

# LLaVA's plain (caption pretraining): the media, then the answer and a newline; no roles, no prompt.
PLAIN = ChatTemplate(
    name="plain", use_state_tokens=False, add_bos=True, system="", user="{text}", assistant="",
    answer_end="\n", after_answer="", media_only_user=True, single_turn=True,
)

TEMPLATES = {
    "qwen2p5_instruct": QWEN2P5_INSTRUCT,
    "qwen2p5_fo_instruct": QWEN2P5_INSTRUCT,
    "llama3": LLAMA3,
    "nemo": NEMO,
    "mixtral_two": MIXTRAL_TWO,
    "plain": PLAIN,
}


PROMPT_MODALITIES = ("image", "video", "lang")


def load_system_prompts(path: str) -> dict:
    """Read ``--system_prompts``: a YAML mapping of ``image`` / ``video`` / ``lang`` to prompt text.

    Modalities left out keep the template's prompt (``lang`` is the fallback for the others).

    Raises:
        FileNotFoundError / ValueError: naming the file and the bad key or value.
    """
    import yaml

    if not os.path.exists(path):
        raise FileNotFoundError(f"--system_prompts {path!r}: no such file")
    with open(path, encoding="utf-8-sig") as fh:
        try:
            prompts = yaml.safe_load(fh)
        except UnicodeDecodeError as err:
            raise ValueError(f"--system_prompts {path}: not UTF-8 text ({err.reason}); re-save it as UTF-8") from None
        except yaml.YAMLError as err:
            raise ValueError(f"--system_prompts {path}: not valid YAML: {err}") from None
    if not isinstance(prompts, dict) or not prompts:
        raise ValueError(f"--system_prompts {path}: expected a mapping of {', '.join(PROMPT_MODALITIES)} to text")
    for key, value in prompts.items():
        if key not in PROMPT_MODALITIES:
            raise ValueError(f"--system_prompts {path}: unknown modality {key!r}; use {', '.join(PROMPT_MODALITIES)}")
        if not isinstance(value, str):
            raise ValueError(f"--system_prompts {path}: the {key!r} prompt must be text, got {type(value).__name__}")
    return prompts


def with_system_prompts(template: ChatTemplate, prompts: dict) -> ChatTemplate:
    """``template`` with ``prompts`` replacing its system prompts, modality by modality."""
    return dataclasses.replace(template, system_prompts={**template.system_prompts, **prompts})


def get_template(version: Optional[str]) -> ChatTemplate:
    """Look a template up by ``--version``; None gives ``qwen2p5_instruct``.

    Raises:
        ValueError: unknown version, naming the known ones.
    """
    key = version or "qwen2p5_instruct"
    if key not in TEMPLATES:
        raise ValueError(f"--version {key!r} is not a known template; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[key]


def _fill(piece: str, system: str, text: str = "") -> str:
    # System first, text last: a user's text containing "{system}" stays as written.
    return piece.replace("{system}", system).replace("{text}", text)


def _encode_text(tokenizer, text: str) -> list[int]:
    ids: list[int] = []
    for piece in _PLACEHOLDER.split(text):
        if piece == DEFAULT_IMAGE_TOKEN:
            ids.append(IMAGE_TOKEN_INDEX)
        elif piece == DEFAULT_AUDIO_TOKEN:
            ids.append(AUDIO_TOKEN_INDEX)
        elif piece:
            ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    return ids


def tokenize_conversation(
    conversations: list[dict],
    tokenizer,
    template: ChatTemplate,
    modality: str,
    inserted_id: Optional[int] = None,
    audio_query: Optional[bool] = None,
    end_tag: bool = True,
) -> tuple[list[int], list[int]]:
    """Turn VITA ``conversations`` into ``(input_ids, labels)``.

    Only assistant answers are supervised: the state token, the answer text and the end-of-turn
    token. ``<image>`` / ``<audio>`` become -200 / -500 (already expanded per tile / frame). Each
    piece is tokenized on its own, so labels line up with ids by construction. Nothing follows the
    last answer (VITA's prompt ends at its end-of-turn token).

    Args:
        conversations: ``[{"from": "human"|"gpt", "value": str}, ...]`` alternating, human first.
        tokenizer: a tokenizer with ``encode``.
        template: the chat template.
        modality: ``image``, ``video`` or ``lang`` (selects the system prompt).
        inserted_id: index of the "neg" turn answered with ``☟``.
        audio_query: force the state token of every answer (True: ``☞``, False: ``☜``); None decides
            per turn from ``<audio>`` in the question (text-only warm-up data stands in for audio).
        end_tag: False drops the last answer's end-of-turn token (VITA's ``end_tag: false``: the model
            is not taught to stop there).

    Raises:
        ValueError: roles that do not alternate human/gpt, naming the turn; a multi-turn sample for a
            single-turn template (``plain``).
    """
    if template.single_turn and len(conversations) != 2:
        raise ValueError(f"--version {template.name} takes exactly one human / gpt exchange per sample; this one has "
                         f"{len(conversations)} turns (use a chat template for multi-turn data)")
    system = template.system_prompts.get(modality, template.system_prompts.get("lang", ""))
    input_ids = []
    if template.add_bos and getattr(tokenizer, "bos_token_id", None) is not None:
        input_ids.append(tokenizer.bos_token_id)  # as the tokenizer would add it to the whole prompt
    input_ids += _encode_text(tokenizer, _fill(template.system, system=system))
    labels = [IGNORE_INDEX] * len(input_ids)
    previous_query = ""
    for index, turn in enumerate(conversations):
        role, value = turn.get("from"), turn.get("value", "")
        expected = "human" if index % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"conversations[{index}] has from={role!r}; expected {expected!r} "
                             "(turns must alternate human, gpt)")
        if role == "human":
            text = "".join(_PLACEHOLDER.findall(value)) if template.media_only_user else value
            piece = template.first_user if index == 0 and template.first_user else template.user
            ids = _encode_text(tokenizer, _fill(piece, system=system, text=text))
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
            previous_query = value
            continue
        prompt = _encode_text(tokenizer, template.assistant)
        state = ""
        if template.use_state_tokens:
            if inserted_id is not None and index == inserted_id:
                state = STATE_INSERTED
            elif audio_query if audio_query is not None else DEFAULT_AUDIO_TOKEN in previous_query:
                state = STATE_AUDIO_QUERY
            else:
                state = STATE_TEXT_QUERY
        last = index == len(conversations) - 1
        answer_end = template.answer_end if end_tag or not last else ""
        answer = _encode_text(tokenizer, f"{state}{value}{answer_end}")
        after = [] if last else _encode_text(tokenizer, template.after_answer)
        input_ids += prompt + answer + after
        labels += [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * len(after)
    return input_ids, labels
