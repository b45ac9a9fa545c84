"""Prompt-only samples: a record's tokens up to its last answer, for generation, and answers read back as text.

A prompt is exactly what training tokenizes before the answer: the record goes through the same
dataset code (media, tiling, VITA's turn rules, the chat template), and the ids are cut where the
last answer's supervised run (state token, text, end of turn) begins. So the prompt ends with the
template's assistant opening (``<|im_start|>assistant\\n`` in ``qwen2p5_instruct``) and the model
generates the state token itself, as it learned to; :meth:`PromptDataset.answer_text` strips it.

Two sources: a run's eval set (:class:`PromptDataset` over its :class:`VitaJsonDataset`, for
``--eval_generate``), or a question asked on the command line (:func:`question_record` and
:func:`records_dataset`, which builds the dataset from the run's :class:`DataSpec` as
:func:`vitacore.data.build_data` does).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

from torch.utils.data import Dataset

from vitacore.constants import (
    AUDIO_TOKEN_INDEX,
    DEFAULT_AUDIO_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    DEFAULT_VIDEO_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from vitacore.data.build import DataSpec, ModelInputs
from vitacore.data.conversation import (
    STATE_AUDIO_QUERY,
    STATE_INSERTED,
    STATE_TEXT_QUERY,
    ChatTemplate,
    get_template,
    load_system_prompts,
    with_system_prompts,
)
from vitacore.data.dataset import Collator, Sample, VitaJsonDataset
from vitacore.data.images import ImageTransform, pad_colour
from vitacore.data.records import record_problem
from vitacore.data.tiling import ImageTiler
from vitacore.data.turns import finish_turn, move_media_first

__all__ = ["STATE_TOKENS", "PromptCollator", "PromptDataset", "PromptSample", "answer_text", "prompt_sample",
           "question_record", "records_dataset", "stop_token_ids"]

STATE_TOKENS = (STATE_AUDIO_QUERY, STATE_TEXT_QUERY, STATE_INSERTED)


@dataclass
class PromptSample(Sample):
    """A :class:`Sample` cut before its last answer (its labels all IGNORE), with that answer's text.

    Attributes:
        reference: the last answer as the record writes it (VITA's turn rules applied), "" when the
            record's last answer is empty (a question asked on the command line).
    """

    reference: str = ""


def _last_answer_start(labels: list[int]) -> int:
    """Where the last supervised run (the last answer: state token, text, end of turn) begins."""
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=None)
    if end is None:
        return len(labels)  # nothing supervised: an empty answer of a template without state tokens
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def prompt_sample(sample: Sample, reference: str) -> PromptSample:
    """``sample`` (as training builds it) cut where its last answer begins; media after the cut are dropped.

    Args:
        sample: a training sample whose last answer is the one to generate.
        reference: that answer's text.
    """
    cut = _last_answer_start(sample.labels)
    ids = sample.input_ids[:cut]
    num_images = sum(1 for token in ids if token == IMAGE_TOKEN_INDEX)
    num_audios = sum(1 for token in ids if token == AUDIO_TOKEN_INDEX)
    values = {field.name: getattr(sample, field.name) for field in fields(Sample)}
    values.update(input_ids=ids, labels=[IGNORE_INDEX] * len(ids), images=sample.images[:num_images],
                  audios=sample.audios[:num_audios], audio_token_lengths=sample.audio_token_lengths[:num_audios])
    return PromptSample(**values, reference=reference)


def _reference(record: dict) -> str:
    """The record's last answer after VITA's turn rules (what training supervises, without state token)."""
    answers = [turn.get("value", "") for turn in record["conversations"] if turn.get("from") == "gpt"]
    return finish_turn(move_media_first(answers[-1])) if answers else ""


def stop_token_ids(tokenizer, template: ChatTemplate) -> list[int]:
    """Ids that end an answer: the template's end-of-turn when it is one token, and the tokenizer's EOS."""
    ids = []
    if template.answer_end:
        end = tokenizer.encode(template.answer_end, add_special_tokens=False)
        if len(end) == 1:
            ids.append(end[0])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def answer_text(token_ids: Sequence[int], tokenizer, template: ChatTemplate) -> str:
    """Generated ids as the answer's text: up to the end of turn, special tokens and the state token removed."""
    stops = set(stop_token_ids(tokenizer, template))
    ids = list(token_ids)
    for position, token in enumerate(ids):
        if token in stops:
            ids = ids[:position]
            break
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if template.answer_end.strip() and template.answer_end in text:  # an end of turn of several tokens
        text = text[: text.index(template.answer_end)]
    text = text.strip()
    while text[:1] in STATE_TOKENS and text:
        text = text[1:].lstrip()
    return text


class PromptDataset(Dataset):
    """The prompt-only view of a :class:`VitaJsonDataset`: item ``i`` is record ``i`` cut before its last answer.

    Bad records are replaced as the dataset replaces them (the reference follows the replacement).

    Args:
        base: the dataset (its tokenizer, template, media transforms and tiling are used as they are).
    """

    def __init__(self, base: VitaJsonDataset):
        self.base = base
        self.tokenizer = base.tokenizer
        self.template = base.template
        self._max_answer_tokens: Optional[int] = None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> PromptSample:
        sample = self.base[index]
        used = sample.replaced_from.replaced_by if sample.replaced_from is not None else index
        return prompt_sample(sample, _reference(self.base.records[used]))

    @property
    def stop_token_ids(self) -> list[int]:
        """See :func:`stop_token_ids`."""
        return stop_token_ids(self.tokenizer, self.template)

    def answer_text(self, token_ids: Sequence[int]) -> str:
        """See :func:`answer_text`."""
        return answer_text(token_ids, self.tokenizer, self.template)

    def max_answer_tokens(self) -> int:
        """The longest reference answer in tokens, with its state token and end of turn (the same on every rank)."""
        if self._max_answer_tokens is None:
            encode = self.tokenizer.encode
            state = max((len(encode(s, add_special_tokens=False)) for s in STATE_TOKENS), default=0) \
                if self.template.use_state_tokens else 0
            end = len(encode(self.template.answer_end, add_special_tokens=False)) if self.template.answer_end else 0
            longest = max((len(encode(_reference(r), add_special_tokens=False)) for r in self.base.records), default=0)
            self._max_answer_tokens = state + longest + end
        return self._max_answer_tokens


# What a prompt batch carries: the model's generate inputs, the bad-sample markers, the answers' texts.
_PROMPT_KEYS = ("input_ids", "attention_mask", "images", "audios", "audio_lengths", "audio_token_lengths",
                "sample_ids", "bad_samples", "references")


class PromptCollator:
    """Batches :class:`PromptSample` s for generation: the training collator's prompt tensors and media
    (no labels, nothing else the training forward reads), plus ``references`` (the answers' texts).

    Args:
        pad_token_id: the tokenizer's pad id (the model re-pads prompts on the left itself).
    """

    def __init__(self, pad_token_id: int):
        self.collate = Collator(pad_token_id)

    def __call__(self, samples: list[PromptSample]) -> dict:
        batch = self.collate(samples)
        batch["references"] = [s.reference for s in samples]
        return {key: value for key, value in batch.items() if key in _PROMPT_KEYS}


def question_record(prompt: str, images: Sequence[str] = (), audios: Sequence[str] = (),
                    video: Optional[str] = None) -> dict:
    """A one-question VITA record: the prompt as a human turn, its media placeholders in front
    (``<image>\\n`` per image, ``<video>\\n``, ``<audio>\\n`` per clip) unless the prompt places them
    itself, and an empty answer to generate.

    Raises:
        ValueError: the prompt's own placeholders do not match the media given, naming the flags.
    """
    if any(token in prompt for token in (DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN, DEFAULT_AUDIO_TOKEN)):
        text = prompt
    else:
        text = (f"{DEFAULT_IMAGE_TOKEN}\n" * len(images) + (f"{DEFAULT_VIDEO_TOKEN}\n" if video else "")
                + f"{DEFAULT_AUDIO_TOKEN}\n" * len(audios) + prompt)
    record = {"id": "prompt", "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": ""}]}
    if images:
        record["image"] = list(images)
    if video:
        record["video"] = video
    if audios:
        record["audio"] = list(audios)
    problem = record_problem(record)
    if problem:
        raise ValueError(f"--prompt with --image / --video / --audio: {problem}")
    return record


def records_dataset(records: list[dict], spec: DataSpec, tokenizer, inputs: ModelInputs,
                    media_root: str = ".", source: str = "--prompt") -> PromptDataset:
    """Prompts of ``records`` built as the run built its samples: ``spec``'s template (``--version``,
    ``--system_prompts``), the tower's image transform with ``--image_aspect_ratio`` and its tiling, and
    the audio encoder's features (``inputs``). Mirrors :func:`vitacore.data.build_data`'s set-up.

    Raises:
        ValueError / FileNotFoundError: an unknown template, or a bad ``--system_prompts`` file.
    """
    template = get_template(spec.version)
    if spec.system_prompts:
        template = with_system_prompts(template, load_system_prompts(spec.system_prompts))
    transform = tiler = None
    if inputs.image_spec is not None:
        image = inputs.image_spec
        pad = spec.image_aspect_ratio == "pad"
        transform = ImageTransform(image.image_size, image.mean, image.std, pad_to_square=pad)
        tiler = ImageTiler(image.image_size, spec.min_dynamic_patch, spec.max_dynamic_patch, spec.use_thumbnail,
                           pad_fill=pad_colour(image.mean) if pad else None)
    base = VitaJsonDataset(records, media_root, tokenizer, template, transform, inputs.audio_transform,
                           source=source, tokens_per_image=inputs.tokens_per_image, image_tiler=tiler,
                           media_limits=spec.media_limits)
    return PromptDataset(base)
