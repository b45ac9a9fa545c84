"""Conversation templates and tokenization with label masking.

Token ids are assembled piece by piece (system, user turns, assistant turns), so the labels line up
with the ids by construction: VITA's "tokenization mismatch, zero the sample" failure mode cannot
happen here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from vitacore.constants import (
    AUDIO_TOKEN_INDEX, DEFAULT_AUDIO_TOKEN, DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX,
)

STATE_AUDIO_QUERY = "☞"
STATE_TEXT_QUERY = "☜"
STATE_INSERTED = "☟"

_PLACEHOLDER = re.compile(f"({re.escape(DEFAULT_IMAGE_TOKEN)}|{re.escape(DEFAULT_AUDIO_TOKEN)})")


@dataclass(frozen=True)
class ChatTemplate:
    """A ChatML-style template (the layout of VITA's ``qwen2p5_instruct``).

    Attributes:
        name: the ``--version`` key.
        system_prompts: one system prompt per modality (``image``, ``video``, ``lang``).
        use_state_tokens: prefix answers with VITA-1.5's state tokens.
    """

    name: str
    system_prompts: dict = field(default_factory=dict)
    use_state_tokens: bool = True
    turn_start: str = "<|im_start|>"
    turn_end: str = "<|im_end|>"


QWEN2P5_INSTRUCT = ChatTemplate(
    name="qwen2p5_instruct",
    system_prompts={
        "image": "You are a helpful multimodal assistant. Answer from what the image shows.",
        "video": "You are a helpful multimodal assistant. Answer from what the video shows.",
        "lang": "You are a helpful multimodal assistant.",
    },
)

TEMPLATES = {"qwen2p5_instruct": QWEN2P5_INSTRUCT, "qwen2p5_fo_instruct": QWEN2P5_INSTRUCT}


def get_template(version: Optional[str]) -> ChatTemplate:
    """Look a template up by ``--version``; None gives ``qwen2p5_instruct``.

    Raises:
        ValueError: unknown version, naming the known ones.
    """
    key = version or "qwen2p5_instruct"
    if key not in TEMPLATES:
        raise ValueError(f"--version {key!r} is not a known template; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[key]


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
) -> tuple[list[int], list[int]]:
    """Turn VITA ``conversations`` into ``(input_ids, labels)``.

    Only assistant answers are supervised: the state token, the answer text and the end-of-turn
    token. ``<image>`` / ``<audio>`` become -200 / -500 (already expanded per tile / frame).

    Args:
        conversations: ``[{"from": "human"|"gpt", "value": str}, ...]`` alternating, human first.
        tokenizer: a tokenizer with ``encode``.
        template: the chat template.
        modality: ``image``, ``video`` or ``lang`` (selects the system prompt).
        inserted_id: index of the "neg" turn answered with ``☟``.
        audio_query: force the state token of every answer (True: ``☞``, False: ``☜``); None decides
            per turn from ``<audio>`` in the question (text-only warm-up data stands in for audio).

    Raises:
        ValueError: roles that do not alternate human/gpt, naming the turn.
    """
    start, end = template.turn_start, template.turn_end
    system = template.system_prompts.get(modality, template.system_prompts.get("lang", ""))
    input_ids = _encode_text(tokenizer, f"{start}system\n{system}{end}\n")
    labels = [IGNORE_INDEX] * len(input_ids)
    previous_query = ""
    for index, turn in enumerate(conversations):
        role, value = turn.get("from"), turn.get("value", "")
        expected = "human" if index % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"conversations[{index}] has from={role!r}; expected {expected!r} (turns must alternate human, gpt)")
        if role == "human":
            ids = _encode_text(tokenizer, f"{start}user\n{value}{end}\n")
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
            previous_query = value
            continue
        prompt = _encode_text(tokenizer, f"{start}assistant\n")
        state = ""
        if template.use_state_tokens:
            if inserted_id is not None and index == inserted_id:
                state = STATE_INSERTED
            elif audio_query if audio_query is not None else DEFAULT_AUDIO_TOKEN in previous_query:
                state = STATE_AUDIO_QUERY
            else:
                state = STATE_TEXT_QUERY
        answer = _encode_text(tokenizer, f"{state}{value}{end}")
        newline = _encode_text(tokenizer, "\n")
        input_ids += prompt + answer + newline
        labels += [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * len(newline)
    return input_ids, labels
