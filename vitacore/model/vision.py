"""Vision towers, loaded from a local folder by the config's ``model_type`` (never by path substrings)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import AutoConfig

# model_type -> (transformers class name, default select_layer, drops a CLS token)
_TOWERS = {
    "siglip_vision_model": ("SiglipVisionModel", -2, False),
    "siglip": ("SiglipVisionModel", -2, False),
    "clip_vision_model": ("CLIPVisionModel", -2, True),
    "clip": ("CLIPVisionModel", -2, True),
}

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageSpec:
    """What the data pipeline must produce for this tower: square images of ``image_size``."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class VisionTower(nn.Module):
    """A transformers vision encoder returning patch features of one hidden layer.

    Args:
        encoder: the transformers vision model.
        select_layer: index into ``hidden_states`` (VITA uses -2 for SigLIP).
        drop_cls: drop the first token (CLIP-style towers carry a CLS token).
        image_spec: size and normalization the tower expects.
        source: where the weights came from (reported, and saved in exports).
    """

    def __init__(self, encoder: nn.Module, select_layer: int, drop_cls: bool, image_spec: ImageSpec, source: str):
        super().__init__()
        self.encoder = encoder
        self.select_layer = select_layer
        self.drop_cls = drop_cls
        self.image_spec = image_spec
        self.source = source

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def num_tokens_per_image(self) -> int:
        cfg = self.encoder.config
        return (cfg.image_size // cfg.patch_size) ** 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode ``(N, 3, H, W)`` images into ``(N, tokens, hidden)`` features."""
        dtype = next(self.encoder.parameters()).dtype
        out = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[self.select_layer]
        return features[:, 1:] if self.drop_cls else features


def _read_image_spec(path: str, image_size: int) -> ImageSpec:
    processor_file = os.path.join(path, "preprocessor_config.json")
    mean, std = SIGLIP_MEAN, SIGLIP_STD
    if os.path.exists(processor_file):
        with open(processor_file) as fh:
            proc = json.load(fh)
        mean = tuple(proc.get("image_mean", mean))
        std = tuple(proc.get("image_std", std))
    return ImageSpec(image_size=image_size, mean=mean, std=std)


def load_vision_tower(path: str, torch_dtype: torch.dtype = torch.float32) -> VisionTower:
    """Load a vision tower from a local folder.

    Args:
        path: a folder holding a transformers ``config.json`` and weights.
        torch_dtype: dtype to load in.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the config's ``model_type`` is not a supported tower.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--vision_tower {path!r}: no such folder")
    config = AutoConfig.from_pretrained(path)
    model_type = config.model_type
    if model_type not in _TOWERS:
        raise ValueError(
            f"--vision_tower {path!r}: config model_type {model_type!r} is not a supported tower; "
            f"supported: {', '.join(sorted(_TOWERS))}"
        )
    class_name, select_layer, drop_cls = _TOWERS[model_type]
    import transformers

    model_class = getattr(transformers, class_name)
    encoder = model_class.from_pretrained(path, dtype=torch_dtype)
    vision_config = getattr(config, "vision_config", config)
    spec = _read_image_spec(path, vision_config.image_size)
    return VisionTower(encoder, select_layer, drop_cls, spec, source=os.path.abspath(path))
