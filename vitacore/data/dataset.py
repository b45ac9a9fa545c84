"""VITA JSON records -> model-ready samples (ids, labels, media tensors)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vitacore.constants import (
    AUDIO_TOKEN_INDEX,
    DEFAULT_AUDIO_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from vitacore.data.audio import AudioTransform
from vitacore.data.audio_files import check_audio_limits
from vitacore.data.bad_samples import ON_BAD_SAMPLE, BadSample, BadSampleError
from vitacore.data.conversation import ChatTemplate, tokenize_conversation
from vitacore.data.images import ImageTransform, load_image
from vitacore.data.length_cache import LengthCacheLocation, cached_lengths
from vitacore.data.lengths import LengthCounter
from vitacore.data.media_limits import MediaLimits, check_record_media
from vitacore.data.record_store import RecordStore, records_fingerprint
from vitacore.data.records import RejectedRecord, load_records
from vitacore.data.records import as_list as _as_list
from vitacore.data.tiling import ImageTiler
from vitacore.data.turns import prepare_turns, turn_order_problem
from vitacore.data.video import VIDEO_MAX_FRAMES, load_video

__all__ = ["Collator", "Sample", "VitaJsonDataset", "load_records", "load_video_frames"]


def load_video_frames(path: str, max_frames: int = VIDEO_MAX_FRAMES,
                      limits: Optional[MediaLimits] = None) -> list[Image.Image]:
    """Sampled frames of a video (see :func:`vitacore.data.video.load_video`; fps dropped)."""
    return load_video(path, max_frames, limits)[0]


@dataclass
class Sample:
    """One tokenized record with its media."""

    sample_id: str
    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor]
    audios: list[torch.Tensor]
    audio_token_lengths: list[int]
    modality: str
    replaced_from: Optional[BadSample] = None  # set when this sample stands in for a bad one
    dataset: str = ""  # the dataset it came from (registry name or file), for per-dataset metrics
    media: str = "text"  # the metrics' modality: video, image, audio or text (the first the record has)


class VitaJsonDataset(Dataset):
    """VITA records whose media paths are absolute or relative to ``media_root``.

    Records from a registry carry absolute media paths (see :mod:`vitacore.data.registry`), so the
    dataset opens files without knowing which folder each set lives in. A run's records come as a
    :class:`~vitacore.data.record_store.RecordStore` (with compact ``origins`` and ``dataset_names``),
    which forked loader workers share without copying; a plain list works too.

    Args:
        records: VITA records (see :func:`load_records`): a list, or a ``RecordStore``.
        media_root: folder that relative ``image`` / ``video`` / ``audio`` paths are relative to.
        tokenizer: the LLM's tokenizer.
        template: the chat template.
        image_transform: image -> tensor for the vision tower.
        audio_transform: wav path -> (fbank, LLM token count).
        source: name used in error messages (the JSON path).
        origins: per record, where it came from (``"file.json, record 7"``), used in error
            messages instead of ``source`` and the dataset index (a list, or a compact
            :class:`~vitacore.data.record_store.RecordOrigins`); None: ``source`` for all.
        tokens_per_image: LLM tokens per image / video frame (the vision tower's
            ``num_tokens_per_image``); only :attr:`modality_lengths` reads it.
        on_bad_sample: ``error`` raises on a bad record (see :mod:`vitacore.data.bad_samples`);
            ``skip`` returns the next good record instead, marked with ``replaced_from``. The run
            sets it from ``--on_bad_sample`` (default ``skip``); a bare dataset is strict.
        image_tiler: tiling (VITA-1.5 tiles for every ``--image_aspect_ratio``): each image becomes
            several tiles and its ``<image>`` as many placeholders. None: one image per ``<image>``.
        media_limits: what one record's media may cost (pixels, frames, audio rate and length, images
            and tiles); over a limit is a bad sample. None: the flags' defaults.
        model_max_length: the model's longest sequence; a record whose answers would all be cut
            away by truncation to it (after media expansion) is bad. None: no check.
        dataset_names: per record, the dataset it belongs to (a list, or a compact
            :class:`~vitacore.data.record_store.CodedStrings`).
        length_cache: where :attr:`modality_lengths` are cached (see
            :mod:`vitacore.data.length_cache`); None: counted on first use, not kept.
    """

    def __init__(self, records, media_root: str, tokenizer, template: ChatTemplate,
                 image_transform: Optional[ImageTransform], audio_transform: Optional[AudioTransform],
                 source: str = "<records>", origins: Optional[list[str]] = None,
                 tokens_per_image: Optional[int] = None,
                 on_bad_sample: str = "error", model_max_length: Optional[int] = None,
                 image_tiler: Optional[ImageTiler] = None, rejected: Sequence[RejectedRecord] = (),
                 dataset_names: Optional[Sequence[str]] = None, media_limits: Optional[MediaLimits] = None,
                 length_cache: Optional[LengthCacheLocation] = None):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample {on_bad_sample!r} is not one of: {', '.join(ON_BAD_SAMPLE)}")
        self.on_bad_sample = on_bad_sample
        self.model_max_length = model_max_length
        if origins is not None and len(origins) != len(records):
            raise ValueError(f"{len(origins)} origins for {len(records)} records; give one per record")
        self.origins = origins
        if dataset_names is not None and len(dataset_names) != len(records):
            raise ValueError(f"{len(dataset_names)} dataset names for {len(records)} records; give one per record")
        self.dataset_names = dataset_names if dataset_names is None or isinstance(dataset_names, Sequence) \
            else list(dataset_names)
        self.records = records
        self.media_root = media_root
        self.tokenizer = tokenizer
        self.template = template
        self.image_transform = image_transform
        self.audio_transform = audio_transform
        self.source = source
        self.tokens_per_image = tokens_per_image
        self.image_tiler = image_tiler
        self.media_limits = media_limits or MediaLimits()
        self.rejected = list(rejected)
        self.length_cache = length_cache
        self._modality_lengths: Optional[np.ndarray] = None
        self._fingerprint: Optional[str] = None

    def _has_visual_media(self) -> bool:
        if isinstance(self.records, RecordStore):
            return bool(self.records.with_media("image", "video").any())
        return any(r.get("image") or r.get("video") for r in self.records)

    @property
    def modality_lengths(self) -> np.ndarray:
        """Per record, its length in LLM tokens (media tokens counted), positive with media and
        negative for text-only records (``int64``); counted on first use from headers only, in
        parallel, and kept in :attr:`length_cache` for the next start (see
        :mod:`vitacore.data.length_cache`). Under ``torch.distributed`` the first use is collective:
        every rank must ask.

        Raises:
            ValueError: the records have images or videos but no ``tokens_per_image`` was given.
        """
        if self._modality_lengths is None:
            if self.tokens_per_image is None and self._has_visual_media():
                raise ValueError("modality_lengths: the records have images or videos but the dataset was built "
                                 "without tokens_per_image (pass the vision tower's num_tokens_per_image)")
            counter = LengthCounter(self.media_root, self.tokenizer, self.template, self.tokens_per_image or 0,
                                    self.audio_transform, self.image_tiler, VIDEO_MAX_FRAMES)
            fingerprint = self.fingerprint if self.length_cache is not None else ""
            self._modality_lengths = cached_lengths(self.records, counter, fingerprint, self.length_cache,
                                                    self.model_max_length)
        return self._modality_lengths

    @property
    def fingerprint(self) -> str:
        """What the dataset holds, as ``"<record count>:<hash>"``: equal on two processes exactly when
        they read the same records in the same order (media paths as resolved, so a different
        ``--image_folder`` counts as different data). Ranks compare it at start, and it names the
        length cache; computed once (a SHA-256 of the record store's buffers, or one pass of JSON
        encoding for a list), then cached.
        """
        if self._fingerprint is None:
            self._fingerprint = records_fingerprint(self.records)
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.records)

    def _path(self, rel: str) -> str:
        return rel if os.path.isabs(rel) else os.path.join(self.media_root, rel)

    def __getitem__(self, index: int) -> Sample:
        try:
            return self._sample_at(index)
        except BadSampleError as err:
            if self.on_bad_sample == "error":
                raise
            bad = err
        # The next good record in index order: the same choice on every run, so resumes are exact.
        for step in range(1, len(self)):
            other = (index + step) % len(self)
            try:
                sample = self._sample_at(other)
            except BadSampleError:
                continue
            sample.replaced_from = BadSample(str(bad), bad.key, index, other)
            return sample
        raise ValueError(f"{self.source}: all {len(self)} records are bad samples, none to train on; "
                         f"the first problem: {bad}")

    def _sample_at(self, index: int) -> Sample:
        record = self.records[index]
        sample_id = str(record.get("id", index))
        try:
            sample = self._build(record, sample_id)
            sample.dataset = self.dataset_names[index] if self.dataset_names is not None else ""
            return sample
        except BadSampleError as err:
            where = self._where(index, sample_id)
            raise BadSampleError(f"{where}: {err}", err.key or where) from None
        except (FileNotFoundError, ValueError) as err:
            # Whatever else this record makes the pipeline refuse (a turn the template cannot take, a
            # count that does not match) is this record's problem too: a bad sample, not a failed run.
            where = self._where(index, sample_id)
            raise BadSampleError(f"{where}: {err}", where) from None

    def _where(self, index: int, sample_id: str) -> str:
        where = self.origins[index] if self.origins is not None else f"{self.source}, record {index}"
        return f"{where} (id {sample_id!r})"

    def _media(self, kind: str, rel: str, load):
        """``load(path)``, with a missing or unreadable file reported as a bad sample."""
        path = self._path(rel)
        try:
            return load(path)
        except BadSampleError:  # over a media limit: its message already names the file and the flag
            raise
        except FileNotFoundError:
            raise BadSampleError(f"missing {kind} file {path}", path) from None
        except (ValueError, OSError) as err:
            raise BadSampleError(f"corrupt {kind} file {path}: {err}", path) from None

    def _build(self, record: dict, sample_id: str) -> Sample:
        order = turn_order_problem(record["conversations"])
        if order:
            raise BadSampleError(order)
        images, modality = [], "lang"
        image_paths, video_paths = _as_list(record.get("image")), _as_list(record.get("video"))
        if (image_paths or video_paths) and self.image_transform is None:
            raise ValueError("record has media but the model has no vision tower")
        tile_counts = []
        limits = self.media_limits  # checked from the text and the headers before anything is decoded
        check_record_media(record["conversations"], [self._path(rel) for rel in image_paths], video_paths, limits,
                           self.image_tiler.count_from_header if self.image_tiler else None)
        for rel in image_paths:
            img = self._media("image", rel, lambda path: load_image(path, limits))
            tiles = self.image_tiler(img, self.image_transform) if self.image_tiler else [self.image_transform(img)]
            images.extend(tiles)
            tile_counts.append(len(tiles))
            modality = "image"
        frame_counts = []
        for rel in video_paths:
            frames = self._media("video", rel, lambda path: load_video_frames(path, limits=limits))
            images.extend(self.image_transform(frame) for frame in frames)
            frame_counts.append(len(frames))
            modality = "video"
        conversations, inserted_id = prepare_turns(record["conversations"], record.get("inserted_id"),
                                                   tile_counts, frame_counts)
        audios, audio_lengths = [], []
        for rel in _as_list(record.get("audio")):
            if self.audio_transform is None:
                raise ValueError("record has audio but the model has no audio encoder")
            features, num_tokens = self._media(
                "audio", rel, lambda path: check_audio_limits(path, limits) or self.audio_transform(path))
            audios.append(features)
            audio_lengths.append(num_tokens)
        num_image_placeholders = sum(t["value"].count(DEFAULT_IMAGE_TOKEN) for t in conversations)
        num_audio_placeholders = sum(t["value"].count(DEFAULT_AUDIO_TOKEN) for t in conversations)
        if num_image_placeholders != len(images):
            raise ValueError(f"{num_image_placeholders} <image>/<video> placeholder(s) in the text but {len(images)} "
                             "image(s)/frame(s) loaded")
        if num_audio_placeholders != len(audios):
            raise ValueError(f"{num_audio_placeholders} <audio> placeholder(s) in the text but {len(audios)} "
                             "audio file(s) given")
        input_ids, labels = tokenize_conversation(conversations, self.tokenizer, self.template, modality,
                                                  inserted_id, end_tag=record.get("end_tag", True))
        self._check_length(input_ids, labels, audio_lengths)
        media = "video" if video_paths else "image" if image_paths else "audio" if audios else "text"
        return Sample(sample_id, input_ids, labels, images, audios, audio_lengths, modality, media=media)

    def _check_length(self, input_ids: list[int], labels: list[int], audio_token_lengths: list[int]) -> None:
        """Bad when no answer token survives truncation to ``model_max_length`` after media expansion.

        Mirrors :func:`vitacore.model.merge.merge_media_embeddings`: each ``<image>`` becomes
        ``tokens_per_image`` positions (1 when unknown: a lower bound), each ``<audio>`` its token
        count; a row longer than ``model_max_length`` is cut there, or at the start of the media
        block the cut would split. A sample with no supervised token left would train on nothing
        (a silent zero-loss row), so it is a bad sample.
        """
        if self.model_max_length is None:
            return
        image_tokens = self.tokens_per_image or 1
        audio_lengths = iter(audio_token_lengths)
        position, cut, first_answer = 0, self.model_max_length, None
        for token, label in zip(input_ids, labels):
            if token == IMAGE_TOKEN_INDEX:
                width = image_tokens
            elif token == AUDIO_TOKEN_INDEX:
                width = next(audio_lengths, 1)
            else:
                width = 1
            if position < cut < position + width:
                cut = position  # the merge never splits a media block: it cuts before it
            if label != IGNORE_INDEX and first_answer is None:
                first_answer = position
            position += width
        if first_answer is None:
            raise BadSampleError("no answer to train on: its answers are empty (no supervised token)")
        if first_answer >= cut:
            raise BadSampleError(
                f"too long: its first answer token is at position {first_answer} after media expansion "
                f"({position} positions in all), so truncation to --model_max_length {self.model_max_length} "
                "would leave nothing to train on")


class Collator:
    """Pads a list of :class:`Sample` into a batch the model's ``forward`` takes."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[Sample]) -> dict:
        longest = max(len(s.input_ids) for s in samples)
        input_ids = torch.full((len(samples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), longest), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample.input_ids)
            input_ids[row, :n] = torch.tensor(sample.input_ids)
            labels[row, :n] = torch.tensor(sample.labels)
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "sample_ids": [s.sample_id for s in samples],
                 # Per row, for the per-modality / per-dataset losses in metrics (the model ignores them).
                 "sample_modalities": [s.media for s in samples], "sample_datasets": [s.dataset for s in samples]}
        replaced = [s.replaced_from for s in samples if s.replaced_from is not None]
        if replaced:  # counted by the trainer (BadSampleLog), which removes the key before the forward
            batch["bad_samples"] = replaced
        images = [image for s in samples for image in s.images]
        if images:
            batch["images"] = torch.stack(images)
        audios = [audio for s in samples for audio in s.audios]
        if audios:
            longest_audio = max(a.shape[0] for a in audios)
            padded = torch.zeros((len(audios), longest_audio, audios[0].shape[1]))
            for i, audio in enumerate(audios):
                padded[i, : audio.shape[0]] = audio
            batch["audios"] = padded
            batch["audio_lengths"] = torch.tensor([a.shape[0] for a in audios])
            batch["audio_token_lengths"] = torch.tensor([n for s in samples for n in s.audio_token_lengths])
        return batch
