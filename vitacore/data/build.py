"""Build a run's datasets from its :class:`DataSpec`: the user's VITA JSON, or bundled files (the demo's)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from vitacore.data.audio import AudioTransform
from vitacore.data.conversation import get_template, load_system_prompts, with_system_prompts
from vitacore.data.dataset import Collator, VitaJsonDataset, load_records
from vitacore.data.images import ImageSpec, ImageTransform
from vitacore.data.registry import DataSource, load_sources, sources_from_config
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
        image_aspect_ratio: ``square``, ``pad``, ``dynamic`` or None.
        min_dynamic_patch / max_dynamic_patch / use_thumbnail: dynamic tiling.
        on_bad_sample: ``error`` or ``skip``.
        model_max_length: a record whose text before its first answer reaches this is bad.
        seed: chooses ``data_ratio`` subsets.
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
    model_max_length: int = 512
    seed: int = 42


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


def audio_transform_for(num_mel_bins: int, feature_extractor=None):
    """The audio transform an encoder reads: its own Whisper ``feature_extractor`` when it has one,
    else Kaldi fbank with ``num_mel_bins`` bins and VITA's token arithmetic."""
    if feature_extractor is not None:
        return WhisperAudioTransform(feature_extractor)
    return AudioTransform(num_mel_bins=num_mel_bins)


def _dataset(paths: list[str], media_root: str, tokenizer, template, image_transform, inputs: ModelInputs):
    records = [record for path in paths for record in load_records(path)]
    return VitaJsonDataset(records, media_root, tokenizer, template, image_transform, inputs.audio_transform,
                           source=", ".join(paths), tokens_per_image=inputs.tokens_per_image)


def _user_dataset(sources: list[DataSource], seed: int, tokenizer, template, image_transform, inputs: ModelInputs):
    records, origins = load_sources(sources, seed)
    if not records:
        raise ValueError(f"no training records in {', '.join(s.chat_path for s in sources)}; "
                         "add records or check data_ratio")
    # Media paths are already absolute on each record, so the root is only a fallback.
    return VitaJsonDataset(records, os.path.dirname(sources[0].chat_path), tokenizer, template,
                           image_transform, inputs.audio_transform, source=", ".join(s.chat_path for s in sources),
                           origins=origins, tokens_per_image=inputs.tokens_per_image)


def _bundle(spec: DataSpec, inputs: ModelInputs, tokenizer, train: VitaJsonDataset,
            eval_set: Optional[VitaJsonDataset]) -> DataBundle:
    """The datasets with the run's bad-sample policy (``--on_bad_sample``, ``--model_max_length``)
    and image tiling (``--image_aspect_ratio dynamic``)."""
    tiler = None
    if spec.image_aspect_ratio == "dynamic" and inputs.image_spec is not None:
        tiler = ImageTiler(inputs.image_spec.image_size, spec.min_dynamic_patch, spec.max_dynamic_patch,
                           spec.use_thumbnail)
    for dataset in (train, eval_set):
        if dataset is not None:
            dataset.on_bad_sample = spec.on_bad_sample
            dataset.model_max_length = spec.model_max_length
            dataset.image_tiler = tiler
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
        eval_set = _user_dataset([eval_source], spec.seed, tokenizer, template, image_transform, inputs)
    if sources is not None:
        train = _user_dataset(sources, spec.seed, tokenizer, template, image_transform, inputs)
        return _bundle(spec, inputs, tokenizer, train, eval_set)
    if spec.bundled is None:
        raise ValueError("no training data: give --data_path, or --data_registry with --dataset_use")
    files = spec.bundled
    train = _dataset(list(files.train), files.media_root, tokenizer, template, image_transform, inputs)
    if eval_set is None and files.eval:
        eval_set = _dataset([files.eval], files.media_root, tokenizer, template, image_transform, inputs)
    return _bundle(spec, inputs, tokenizer, train, eval_set)
