"""Build a run's datasets from its :class:`DataSpec`: the user's VITA JSON, or bundled files (the demo's).

The records are held in a :class:`~vitacore.data.record_store.RecordStore`, which forked loader
workers share without copying, and their modality lengths are cached beside the data (see
:mod:`vitacore.data.length_cache`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from vitacore.console import logger
from vitacore.data.audio import AudioTransform
from vitacore.data.conversation import get_template, load_system_prompts, with_system_prompts
from vitacore.data.dataset import Collator, VitaJsonDataset
from vitacore.data.images import ImageSpec, ImageTransform, pad_colour
from vitacore.data.kaldi_fbank import FbankSettings, KaldiFbankTransform
from vitacore.data.length_cache import LengthCacheLocation
from vitacore.data.media_limits import MediaLimits
from vitacore.data.record_store import MEDIA_FLAGS, CodedStrings, RecordStore, RecordStoreBuilder
from vitacore.data.records import RejectedRecord, read_records
from vitacore.data.registry import DataSource, dataset_names_of, load_sources, sources_from_config
from vitacore.data.tiling import ImageTiler
from vitacore.data.whisper_audio import WhisperAudioTransform


@dataclass(frozen=True)
class BundledFiles:
    """JSON files whose relative media paths are relative to one folder (the embedded demo's data).

    Attributes:
        train: the training files.
        eval: the held-out file (None: no eval set unless ``DataSpec.eval_data_path``).
        media_root: the folder relative media paths start from.
    """

    train: tuple[str, ...]
    eval: Optional[str]
    media_root: str


@dataclass(frozen=True)
class DataSpec:
    """The data a run reads and how its samples are made (VITA's data flags, typed).

    Attributes:
        version: the chat template (``--version``), already resolved for the LLM.
        system_prompts: a YAML file replacing the template's system prompts by modality.
        data_path / dataset_use / data_registry: the user's data (see :mod:`vitacore.data.registry`).
        image_folder / audio_folder / video_folder: media folders (None: each JSON file's folder).
        eval_data_path: held-out VITA JSON (media relative to its folder).
        bundled: files used when the user gives no data (the embedded demo's).
        image_aspect_ratio: ``square``, ``dynamic`` or None (tile the image as it is) or ``pad`` (pad it
            to a square with the mean colour, then tile): VITA-1.5 tiles for every value.
        min_dynamic_patch / max_dynamic_patch / use_thumbnail: tiling (``max_dynamic_patch`` 1: no tiling).
        on_bad_sample: ``error`` or ``skip``.
        max_bad_sample_ratio: under ``skip``, the largest share of a dataset's records that may break
            VITA's schema (they are dropped and counted when the files are read).
        min_samples_for_bad_ratio: the ratio applies only to datasets of at least this many records
            (so one bad record in a small file does not stop the run).
        restrict_media_paths: a media path that resolves outside its folder makes its record bad.
        model_max_length: a record whose text before its first answer reaches this is bad.
        media_limits: what one record's media may cost (the ``--max_image_pixels`` ... flags).
        seed: chooses ``data_ratio`` subsets.
        length_cache_dir: folder of the modality-length cache (None: ``.vitacore_lengths`` beside
            the first data file; see :mod:`vitacore.data.length_cache`).
        output_dir: the run's output folder: the length cache goes there when the data's folder
            is not writable (None: it is then not kept).
    """

    version: Optional[str] = None
    system_prompts: Optional[str] = None
    data_path: Optional[str] = None
    dataset_use: Optional[str] = None
    data_registry: Optional[str] = None
    image_folder: Optional[str] = None
    audio_folder: Optional[str] = None
    video_folder: Optional[str] = None
    eval_data_path: Optional[str] = None
    bundled: Optional[BundledFiles] = None
    image_aspect_ratio: Optional[str] = None
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    on_bad_sample: str = "skip"
    max_bad_sample_ratio: float = 0.01
    min_samples_for_bad_ratio: int = 200
    restrict_media_paths: bool = False
    model_max_length: int = 512
    seed: int = 42
    media_limits: MediaLimits = MediaLimits()
    length_cache_dir: Optional[str] = None
    output_dir: Optional[str] = None


@dataclass(frozen=True)
class ModelInputs:
    """What the model's encoders take, as the data pipeline must produce it.

    Attributes:
        image_spec: the vision tower's image size and normalization (None: no tower).
        tokens_per_image: LLM tokens per image or video frame (the tower's ``num_tokens_per_image``).
        audio_transform: audio file -> (features, LLM tokens) for the audio encoder (None: no encoder).
    """

    image_spec: Optional[ImageSpec] = None
    tokens_per_image: Optional[int] = None
    audio_transform: Optional[object] = None


@dataclass
class DataBundle:
    """Train / eval datasets and the collator."""

    train: VitaJsonDataset
    eval: Optional[VitaJsonDataset]
    collator: Collator


def audio_transform_for(num_mel_bins: int, feature_extractor=None, fbank_settings: Optional[FbankSettings] = None,
                        adapter_stride: int = 2):
    """The audio transform an encoder reads: its own Whisper ``feature_extractor`` when it has one;
    VITA's Kaldi fbank with its yaml's ``fbank_settings`` (tokens per ``adapter_stride`` encoder
    states) for VITA's own encoder; else Kaldi-style fbank with ``num_mel_bins`` bins."""
    if feature_extractor is not None:
        return WhisperAudioTransform(feature_extractor)
    if fbank_settings is not None:
        return KaldiFbankTransform(fbank_settings, adapter_stride=adapter_stride)
    return AudioTransform(num_mel_bins=num_mel_bins)


_NUM_NAMED = 5  # malformed records named in the log; the rest are counted


def _checked(records: Sequence[dict], rejected: list[RejectedRecord], spec: DataSpec, source: str) -> Sequence[dict]:
    """The good records, after the bad-record policy: ``error`` stops at the first bad one; ``skip``
    names the first few, counts them and stops only past ``max_bad_sample_ratio`` of the records (in a
    dataset of at least ``min_samples_for_bad_ratio`` records), or when no good record is left."""
    if not rejected:
        return records
    if spec.on_bad_sample == "error":
        raise ValueError(f"{rejected[0].message} (--on_bad_sample error; 'skip' drops and counts such records)")
    total = len(records) + len(rejected)
    for bad in rejected[:_NUM_NAMED]:
        logger.warning(f"warning: dropped a malformed record, {bad.message} (--on_bad_sample skip)")
    if len(rejected) > _NUM_NAMED:
        logger.warning(f"warning: ... and {len(rejected) - _NUM_NAMED} more malformed record(s) dropped")
    if not records:
        raise ValueError(f"{source}: all {total} records are bad (the warnings above name the first); "
                         "none is left to train on")
    if total >= spec.min_samples_for_bad_ratio and len(rejected) > spec.max_bad_sample_ratio * total:
        raise ValueError(f"{source}: {len(rejected)} of {total} records break VITA's record schema "
                         f"({len(rejected) / total:.1%}), more than --max_bad_sample_ratio "
                         f"{spec.max_bad_sample_ratio}; the warnings above name them. Fix the data, or raise "
                         "--max_bad_sample_ratio")
    return records


def _length_cache(spec: DataSpec, data_file: str) -> LengthCacheLocation:
    return LengthCacheLocation(spec.length_cache_dir, data_file, spec.output_dir)


def _dataset(paths: list[str], media_root: str, tokenizer, template, image_transform, inputs: ModelInputs,
             spec: DataSpec):
    builder, codes, rejected, names = RecordStoreBuilder(), [], [], []
    for code, path in enumerate(paths):
        good, bad = read_records(path, "bundled data")
        for record in good:
            builder.append(record)
        codes += [code] * len(good)
        rejected += bad
        names.append(os.path.splitext(os.path.basename(path))[0])
    records = builder.finish()
    return VitaJsonDataset(_checked(records, rejected, spec, ", ".join(paths)), media_root, tokenizer, template,
                           image_transform, inputs.audio_transform, source=", ".join(paths),
                           tokens_per_image=inputs.tokens_per_image, rejected=rejected,
                           dataset_names=CodedStrings(np.asarray(codes, dtype=np.int32), names),
                           length_cache=_length_cache(spec, paths[0]))


def _user_dataset(sources: list[DataSource], spec: DataSpec, tokenizer, template, image_transform,
                  inputs: ModelInputs):
    records, origins, rejected = load_sources(sources, spec.seed, spec.restrict_media_paths)
    names = ", ".join(s.chat_path for s in sources)
    if not records and not rejected:
        raise ValueError(f"no training records in {names}; add records or check data_ratio")
    records = _checked(records, rejected, spec, names)
    # Media paths are already absolute on each record, so the root is only a fallback.
    return VitaJsonDataset(records, os.path.dirname(sources[0].chat_path), tokenizer, template,
                           image_transform, inputs.audio_transform, source=names,
                           origins=origins, tokens_per_image=inputs.tokens_per_image, rejected=rejected,
                           dataset_names=dataset_names_of(sources, origins),
                           length_cache=_length_cache(spec, sources[0].chat_path))


def _first_with(records, field: str) -> Optional[int]:
    if isinstance(records, RecordStore):  # the store knows which records have which media
        having = np.flatnonzero(records.flags & MEDIA_FLAGS[field])
        return int(having[0]) if len(having) else None
    return next((i for i, record in enumerate(records) if record.get(field)), None)


def _check_modalities(dataset: VitaJsonDataset, inputs: ModelInputs) -> None:
    """Refuse data whose media the model has no encoder for, naming the first such record and the flag."""
    needs = (("image", inputs.image_spec, "--vision_tower"), ("video", inputs.image_spec, "--vision_tower"),
             ("audio", inputs.audio_transform, "--audio_encoder"))
    found = [(index, order) for order, (field, encoder, _) in enumerate(needs)
             if encoder is None and (index := _first_with(dataset.records, field)) is not None]
    if found:
        index, order = min(found)
        field, _, flag = needs[order]
        where = dataset.origins[index] if dataset.origins is not None else f"{dataset.source}, record {index}"
        raise ValueError(f"{where} has field '{field}' but the model has no encoder for it; give {flag} "
                         f"(or train on data without {field})")


def _bundle(spec: DataSpec, inputs: ModelInputs, tokenizer, train: VitaJsonDataset,
            eval_set: Optional[VitaJsonDataset]) -> DataBundle:
    """The datasets with the run's bad-sample policy (``--on_bad_sample``, ``--model_max_length``)
    and image tiling (VITA-1.5 tiles whatever ``--image_aspect_ratio`` says; ``pad`` pads first)."""
    tiler = None
    if inputs.image_spec is not None:
        fill = pad_colour(inputs.image_spec.mean) if spec.image_aspect_ratio == "pad" else None
        tiler = ImageTiler(inputs.image_spec.image_size, spec.min_dynamic_patch, spec.max_dynamic_patch,
                           spec.use_thumbnail, pad_fill=fill)
    for dataset in (train, eval_set):
        if dataset is not None:
            _check_modalities(dataset, inputs)
            dataset.on_bad_sample = spec.on_bad_sample
            dataset.model_max_length = spec.model_max_length
            dataset.image_tiler = tiler
            dataset.media_limits = spec.media_limits
    return DataBundle(train, eval_set, Collator(tokenizer.pad_token_id))


def build_data(spec: DataSpec, tokenizer, inputs: ModelInputs) -> DataBundle:
    """Datasets for ``spec``: the user's data (``data_path``, or ``data_registry`` with
    ``dataset_use``), else the ``bundled`` files.

    Eval data: ``eval_data_path`` (media relative to its folder); with the user's training data and
    no eval path, no eval set; with bundled files, their held-out file.

    Args:
        spec: what to read and how.
        tokenizer: the LLM's tokenizer.
        inputs: what the model's encoders take (image size and normalization, audio features).

    Raises:
        ValueError: bad data flags, an unknown dataset name, a malformed file or record, or no data.
        FileNotFoundError: a data file or folder that does not exist.
    """
    sources = sources_from_config(spec)  # flag mistakes surface before any media work
    template = get_template(spec.version)
    if spec.system_prompts:
        template = with_system_prompts(template, load_system_prompts(spec.system_prompts))
    image_transform = None
    if inputs.image_spec is not None:
        image = inputs.image_spec
        image_transform = ImageTransform(image.image_size, image.mean, image.std,
                                         pad_to_square=spec.image_aspect_ratio == "pad")
    eval_set = None
    if spec.eval_data_path:
        eval_source = DataSource(os.path.abspath(spec.eval_data_path), "--eval_data_path")  # media beside the JSON
        eval_set = _user_dataset([eval_source], spec, tokenizer, template, image_transform, inputs)
    if sources is not None:
        train = _user_dataset(sources, spec, tokenizer, template, image_transform, inputs)
        return _bundle(spec, inputs, tokenizer, train, eval_set)
    if spec.bundled is None:
        raise ValueError("no training data: give --data_path, or --data_registry with --dataset_use")
    files = spec.bundled
    train = _dataset(list(files.train), files.media_root, tokenizer, template, image_transform, inputs, spec)
    if eval_set is None and files.eval:
        eval_set = _dataset([files.eval], files.media_root, tokenizer, template, image_transform, inputs, spec)
    return _bundle(spec, inputs, tokenizer, train, eval_set)
