"""Build the run's datasets: the user's VITA JSON, or the embedded synthetic data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from vitacore.data.conversation import get_template
from vitacore.data.dataset import Collator, VitaJsonDataset, load_records
from vitacore.data.media import ImageTransform
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


def _dataset(paths: list[str], media_root: str, bundle, template, image_transform, audio_transform):
    records = [record for path in paths for record in load_records(path)]
    return VitaJsonDataset(records, media_root, bundle.tokenizer, template, image_transform, audio_transform,
                           source=", ".join(paths))


def build_data(config, bundle, selection: SyntheticSelection = SyntheticSelection()) -> DataBundle:
    """Datasets for ``config``; without ``--dataset_use``, the synthetic subsets in ``selection``.

    Raises:
        ValueError: ``--dataset_use`` given (the dataset registry is not available yet).
    """
    if config.data.dataset_use:
        raise ValueError(f"--dataset_use {config.data.dataset_use!r}: dataset registries are not supported yet; "
                         "omit it to train on the embedded synthetic data")
    head = getattr(bundle.model, "state_head", None)
    if head is not None and any(p.requires_grad for p in head.parameters()):
        raise ValueError("--audio_state_predictor_tuning True: the state head needs per-turn user-state labels, "
                         "which this data pipeline does not produce yet; set it to False")
    template = get_template(config.model.version)  # build_model resolved it from the LLM when not given
    tower = bundle.model.vision_tower
    spec = tower.image_spec
    image_transform = ImageTransform(spec.image_size, spec.mean, spec.std,
                                     pad_to_square=config.data.image_aspect_ratio == "pad")
    # The encoder decides its features (fbank or Whisper's log-mel) and token counts; the bundle says which.
    audio_transform = bundle.audio_transform
    if audio_transform is None and bundle.model.audio_encoder is not None:
        audio_transform = audio_transform_for(bundle.model.audio_encoder)
    assets = bundle.default_assets or ensure_default_assets()
    train = _dataset([assets.subset(s) for s in selection.train], assets.data_root, bundle, template,
                     image_transform, audio_transform)
    eval_paths = [config.data.eval_data_path] if config.data.eval_data_path else [assets.subset(selection.eval)]
    eval_root = os.path.dirname(eval_paths[0]) if config.data.eval_data_path else assets.data_root
    eval_set = _dataset(eval_paths, eval_root, bundle, template, image_transform, audio_transform)
    return DataBundle(train, eval_set, Collator(bundle.tokenizer.pad_token_id))
