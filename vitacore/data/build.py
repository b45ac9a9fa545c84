"""Build the run's datasets: the user's VITA JSON, or the embedded synthetic data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from vitacore.data.conversation import get_template, load_system_prompts, with_system_prompts
from vitacore.data.dataset import Collator, VitaJsonDataset, load_records
from vitacore.data.media import ImageTransform
from vitacore.data.registry import DataSource, load_sources, sources_from_config
from vitacore.data.tiling import ImageTiler
from vitacore.model.audio import audio_transform_for
from vitacore.model.default import ensure_default_assets



@dataclass(frozen=True)
class SyntheticSelection:
    """Which subsets of the embedded synthetic data a stage trains and evaluates on."""

    train: tuple = ("image",)
    eval: str = "eval_image"


@dataclass
class DataBundle:
    """Train / eval datasets and the collator."""

    train: VitaJsonDataset
    eval: Optional[VitaJsonDataset]
    collator: Collator


def _tokens_per_image(bundle) -> Optional[int]:
    """LLM tokens per image or video frame, for the datasets' modality lengths (None: no tower)."""
    tower = bundle.model.vision_tower
    return None if tower is None else tower.num_tokens_per_image


def _dataset(paths: list[str], media_root: str, bundle, template, image_transform, audio_transform):
    records = [record for path in paths for record in load_records(path)]
    return VitaJsonDataset(records, media_root, bundle.tokenizer, template, image_transform, audio_transform,
                           source=", ".join(paths), tokens_per_image=_tokens_per_image(bundle))


def _user_dataset(sources: list[DataSource], seed: int, bundle, template, image_transform, audio_transform):
    records, origins = load_sources(sources, seed)
    if not records:
        raise ValueError(f"no training records in {', '.join(s.chat_path for s in sources)}; "
                         "add records or check data_ratio")
    # Media paths are already absolute on each record, so the root is only a fallback.
    return VitaJsonDataset(records, os.path.dirname(sources[0].chat_path), bundle.tokenizer, template,
                           image_transform, audio_transform, source=", ".join(s.chat_path for s in sources),
                           origins=origins, tokens_per_image=_tokens_per_image(bundle))


def _bundle(config, bundle, train: VitaJsonDataset, eval_set: Optional[VitaJsonDataset]) -> DataBundle:
    """The datasets with the run's bad-sample policy (``--on_bad_sample``, ``--model_max_length``)
    and image tiling (``--image_aspect_ratio dynamic``)."""
    tiler = None
    tower = bundle.model.vision_tower
    if config.data.image_aspect_ratio == "dynamic" and tower is not None:
        tiler = ImageTiler(tower.image_spec.image_size, config.data.min_dynamic_patch,
                           config.data.max_dynamic_patch, config.data.use_thumbnail)
    for dataset in (train, eval_set):
        if dataset is not None:
            dataset.on_bad_sample = config.data.on_bad_sample
            dataset.model_max_length = config.training.model_max_length
            dataset.image_tiler = tiler
    return DataBundle(train, eval_set, Collator(bundle.tokenizer.pad_token_id))


def build_data(config, bundle, selection: SyntheticSelection = SyntheticSelection()) -> DataBundle:
    """Datasets for ``config``: the user's data (``--data_path`` or ``--data_registry`` with
    ``--dataset_use``), else the embedded synthetic subsets in ``selection``.

    Eval data: ``--eval_data_path`` (media relative to its folder); with the user's training data
    and no eval path, no eval set; with the embedded data, the synthetic held-out subset.

    Raises:
        ValueError: bad data flags, an unknown dataset name, or a malformed file or record.
        FileNotFoundError: a data file or folder that does not exist.
    """
    sources = sources_from_config(config.data)  # flag mistakes surface before any media work
    head = getattr(bundle.model, "state_head", None)
    if head is not None and any(p.requires_grad for p in head.parameters()):
        raise ValueError("--audio_state_predictor_tuning True: the state head needs per-turn user-state labels, "
                         "which this data pipeline does not produce yet; set it to False")
    template = get_template(config.model.version)  # build_model resolved it from the LLM when not given
    if config.data.system_prompts:
        template = with_system_prompts(template, load_system_prompts(config.data.system_prompts))
    tower = bundle.model.vision_tower
    spec = tower.image_spec
    image_transform = ImageTransform(spec.image_size, spec.mean, spec.std,
                                     pad_to_square=config.data.image_aspect_ratio == "pad")
    # The encoder decides its features (fbank or Whisper's log-mel) and token counts; the bundle says which.
    audio_transform = bundle.audio_transform
    if audio_transform is None and bundle.model.audio_encoder is not None:
        audio_transform = audio_transform_for(bundle.model.audio_encoder)
    seed = config.training.seed
    eval_path = config.data.eval_data_path
    eval_set = None
    if eval_path:
        eval_source = DataSource(os.path.abspath(eval_path), "--eval_data_path")  # media beside the JSON
        eval_set = _user_dataset([eval_source], seed, bundle, template, image_transform, audio_transform)
    if sources is not None:
        train = _user_dataset(sources, seed, bundle, template, image_transform, audio_transform)
        return _bundle(config, bundle, train, eval_set)
    assets = bundle.default_assets or ensure_default_assets()
    train = _dataset([assets.subset(s) for s in selection.train], assets.data_root, bundle, template,
                     image_transform, audio_transform)
    if eval_set is None:
        eval_set = _dataset([assets.subset(selection.eval)], assets.data_root, bundle, template,
                            image_transform, audio_transform)
    return _bundle(config, bundle, train, eval_set)
