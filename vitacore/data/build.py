"""Build the run's datasets: the user's VITA JSON, or the embedded synthetic data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from vitacore.data.conversation import get_template
from vitacore.data.dataset import Collator, VitaJsonDataset, load_records
from vitacore.data.media import AudioTransform, ImageTransform
from vitacore.model.default import ensure_default_assets

# Which synthetic subsets each stage trains on (the embedded demo only).
SYNTHETIC_TRAIN_SUBSETS = {"1": ("image",)}
SYNTHETIC_EVAL_SUBSET = "eval_image"


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


def build_data(config, bundle, stage_key: str) -> DataBundle:
    """Datasets for ``config``; the embedded default uses the synthetic subsets of ``stage_key``.

    Raises:
        ValueError: ``--dataset_use`` given (the dataset registry is not available yet).
    """
    if config.data.dataset_use:
        raise ValueError(f"--dataset_use {config.data.dataset_use!r}: dataset registries are not supported yet; "
                         "omit it to train on the embedded synthetic data")
    template = get_template(config.model.version)
    tower = bundle.model.vision_tower
    spec = tower.image_spec
    image_transform = ImageTransform(spec.image_size, spec.mean, spec.std,
                                     pad_to_square=config.data.image_aspect_ratio == "pad")
    audio_transform = AudioTransform()
    assets = bundle.default_assets or ensure_default_assets()
    subsets = SYNTHETIC_TRAIN_SUBSETS.get(stage_key, ("image",))
    train = _dataset([assets.subset(s) for s in subsets], assets.data_root, bundle, template,
                     image_transform, audio_transform)
    eval_paths = [config.data.eval_data_path] if config.data.eval_data_path else [assets.subset(SYNTHETIC_EVAL_SUBSET)]
    eval_root = os.path.dirname(eval_paths[0]) if config.data.eval_data_path else assets.data_root
    eval_set = _dataset(eval_paths, eval_root, bundle, template, image_transform, audio_transform)
    return DataBundle(train, eval_set, Collator(bundle.tokenizer.pad_token_id))
