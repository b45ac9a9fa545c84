"""Vision towers, loaded from a local folder by the config's ``model_type`` (never by path substrings).

Supported families (:data:`TOWERS`), each with VITA's feature selection:

- SigLIP: ``hidden_states[-2]``, every token kept (SigLIP has no CLS token).
- CLIP: ``hidden_states[-2]``, CLS token dropped.
- InternViT (``intern_vit_6b``, VITA-1.5's tower): remote code, run from the files its config's
  ``auto_map`` names, only with ``--trust_remote_code``, through :mod:`vitacore.model.remote_code`, which loads the
  released folder without timm and despite its missing ``post_init()``; ``hidden_states[-1]``, CLS dropped, then VITA's
  pixel shuffle of the features scaled by 0.5 (:func:`vita_pixel_shuffle`): ``(N, 1024, 1024)`` →
  ``(N, 256, 4096)`` for InternViT-300M-448px.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from vitacore.data.images import ImageSpec
from vitacore.model.loading import LOAD_ERRORS
from vitacore.model.remote_code import build_remote_model, load_remote_config, load_remote_weights, require_trust

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults (OpenAI CLIP)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what InternViT's preprocessor_config.json holds
IMAGENET_STD = (0.229, 0.224, 0.225)
# VITA multiplies InternViT's features by this before the pixel shuffle (internvit_encoder.py); the
# projectors of VITA's checkpoints were trained on the scaled features, so it is part of the weights.
PIXEL_SHUFFLE_FEATURE_SCALE = 0.5
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class TowerKind:
    """How one family of towers is built and read.

    Attributes:
        class_name: the transformers class; None for remote code (built through ``AutoModel``).
        select_layer: index into ``hidden_states``.
        drop_cls: the tower emits a leading CLS token, which is dropped.
        pixel_shuffle: merge each 2×2 block of patches into one token (:func:`vita_pixel_shuffle`).
        remote_code: the model's code lives in its folder (``auto_map``); needs ``trust_remote_code``.
        mean: normalization when the folder has no ``preprocessor_config.json``.
        std: as ``mean``.
    """

    class_name: Optional[str]
    select_layer: int
    drop_cls: bool
    pixel_shuffle: bool = False
    remote_code: bool = False
    mean: tuple = SIGLIP_MEAN
    std: tuple = SIGLIP_STD


_SIGLIP = TowerKind("SiglipVisionModel", -2, False)
_CLIP = TowerKind("CLIPVisionModel", -2, True, mean=CLIP_MEAN, std=CLIP_STD)
_INTERNVIT = TowerKind(None, -1, True, pixel_shuffle=True, remote_code=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)

# config.json model_type -> kind. "siglip" / "clip" are the full two-tower configs (vision part used).
TOWERS = {
    "siglip_vision_model": _SIGLIP,
    "siglip": _SIGLIP,
    "clip_vision_model": _CLIP,
    "clip": _CLIP,
    "intern_vit_6b": _INTERNVIT,
}


def vita_pixel_shuffle(features: torch.Tensor) -> torch.Tensor:
    """VITA's / InternVL's pixel shuffle (scale 0.5): every 2×2 block of patches becomes one token.

    ``features`` are patch tokens in the ViT's row-major order (token ``r * side + c`` is the patch
    at row ``r``, column ``c`` of a square grid). Output token ``i * side/2 + j`` (row-major over the
    2×2 blocks) is the concatenation, along channels, of the patches

        (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)

    i.e. block row offset major, column offset minor. This is what InternVL's ``pixel_shuffle``
    (``ps_version`` v2, the one VITA's ``InternViTVisionTower`` copies) computes with its
    view → permute → view → permute sequence; the projector's input columns depend on this order.

    Args:
        features: ``(N, side * side, C)``, ``side`` even.

    Returns:
        ``(N, side * side / 4, 4 * C)``.

    Raises:
        ValueError: the token count is not the square of an even number.
    """
    batch, tokens, channels = features.shape
    side = math.isqrt(tokens)
    if side * side != tokens or side % 2:
        raise ValueError(f"pixel shuffle needs a square grid with an even side; got {tokens} tokens")
    half = side // 2
    # (N, row block i, row offset dr, col block j, col offset dc, C) -> (N, i, j, dr, dc, C)
    blocks = features.reshape(batch, half, 2, half, 2, channels).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(batch, half * half, 4 * channels)


class VisionTower(nn.Module):
    """A transformers vision encoder returning patch features of one hidden layer.

    Args:
        encoder: the transformers vision model (or a remote-code one, e.g. InternViT).
        select_layer: index into ``hidden_states`` (VITA uses -2 for SigLIP / CLIP, -1 for InternViT).
        drop_cls: drop the first token (CLIP-style towers carry a CLS token).
        image_spec: size and normalization the tower expects.
        source: where the weights came from (reported, and saved in exports).
        pixel_shuffle: scale the features by 0.5 and merge 2×2 patches (VITA's InternViT path).
    """

    def __init__(self, encoder: nn.Module, select_layer: int, drop_cls: bool, image_spec: ImageSpec, source: str,
                 pixel_shuffle: bool = False):
        super().__init__()
        self.encoder = encoder
        self.select_layer = select_layer
        self.drop_cls = drop_cls
        self.image_spec = image_spec
        self.source = source
        self.pixel_shuffle = pixel_shuffle

    @property
    def hidden_size(self) -> int:
        """Width of the output features (the projector's input)."""
        return self.encoder.config.hidden_size * (4 if self.pixel_shuffle else 1)

    @property
    def num_tokens_per_image(self) -> int:
        """Output tokens per image (after the pixel shuffle): what the LLM and projector see."""
        cfg = self.encoder.config
        patches = (cfg.image_size // cfg.patch_size) ** 2
        return patches // 4 if self.pixel_shuffle else patches

    @property
    def encoder_tokens_per_image(self) -> int:
        """Tokens the encoder itself runs on per image (patches plus a CLS token where it has one)."""
        cfg = self.encoder.config
        return (cfg.image_size // cfg.patch_size) ** 2 + (1 if self.drop_cls else 0)

    @property
    def fewest_tokens(self) -> int:
        """The fewest tokens the blocks can run on and still give features: one patch (a 2×2 block under the
        pixel shuffle), plus the CLS token where the tower has one."""
        return (4 if self.pixel_shuffle else 1) + (1 if self.drop_cls else 0)

    def fewest_token_cuts(self) -> list[tuple[nn.Module, int, int]]:
        """``(module, dim, length)``: a dummy pass (:mod:`vitacore.model.encoder_sync`) cuts the embeddings' output
        to :attr:`fewest_tokens`, before the first block (so before any block recomputed in backward)."""
        embeddings = getattr(self.encoder, "vision_model", self.encoder).embeddings  # older transformers nest it
        return [(embeddings, -2, self.fewest_tokens)]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode ``(N, 3, H, W)`` images into ``(N, num_tokens_per_image, hidden_size)`` features."""
        dtype = next(self.encoder.parameters()).dtype
        out = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[self.select_layer]
        if self.drop_cls:
            features = features[:, 1:]
        if self.pixel_shuffle:
            features = vita_pixel_shuffle(features * PIXEL_SHUFFLE_FEATURE_SCALE)
        return features


def read_image_spec(path: str, image_size: int, kind: TowerKind = _SIGLIP) -> ImageSpec:
    """Mean / std from ``path``'s ``preprocessor_config.json`` (the tower's own image processor),
    else the family's defaults; the size is the tower config's ``image_size``."""
    processor_file = os.path.join(path, PROCESSOR_FILE)
    mean, std = kind.mean, kind.std
    if os.path.exists(processor_file):
        with open(processor_file) as fh:
            proc = json.load(fh)
        mean = tuple(proc.get("image_mean", mean))
        std = tuple(proc.get("image_std", std))
    return ImageSpec(image_size=image_size, mean=mean, std=std)


def tower_kind(path: str, label: Optional[str] = None) -> tuple[str, TowerKind]:
    """``(model_type, kind)`` of the tower in ``path``, read from its config.json as plain JSON (so no
    remote code runs before the type is known to be a supported one); messages name it ``label``
    (default ``--vision_tower 'path'``).

    Raises:
        FileNotFoundError: ``path`` or its config.json does not exist.
        ValueError: the ``model_type`` is not a supported tower, or a remote-code tower lacks its ``auto_map``.
    """
    label = label or _label(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{label}: no such folder")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{label}: no config.json there; pass a folder saved with "
                                "save_pretrained (SigLIP, CLIP) or a released InternViT folder")
    with open(config_file) as fh:
        try:
            raw = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{label}: config.json is not valid JSON ({err}); restore the file "
                             "from the tower's release") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in TOWERS:
        raise ValueError(f"{label}: config model_type {model_type!r} is not a supported tower; "
                         f"supported: {', '.join(sorted(TOWERS))}")
    kind = TOWERS[model_type]
    if kind.remote_code and "AutoModel" not in (raw.get("auto_map") or {}):
        raise ValueError(f"{label}: model_type {model_type!r} is loaded as remote code, but "
                         "config.json has no auto_map.AutoModel entry; use the folder as released (its "
                         "config.json, configuration_*.py and modeling_*.py)")
    return model_type, kind


def _tower_config(path: str, kind: TowerKind, trust_remote_code: bool, label: str):
    if kind.remote_code:
        config = load_remote_config(path, trust_remote_code, label=label)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
    return getattr(config, "vision_config", config)  # full SigLIP / CLIP configs hold the vision part


def _check_grid(label: str, kind: TowerKind, vision_config) -> None:
    side = vision_config.image_size // vision_config.patch_size
    if kind.pixel_shuffle and side % 2:
        raise ValueError(f"{label}: image_size {vision_config.image_size} / patch_size "
                         f"{vision_config.patch_size} gives a {side}×{side} patch grid; the 2×2 pixel shuffle "
                         "needs an even side")


def build_vision_tower(path: str, torch_dtype: torch.dtype = torch.float32, source: Optional[str] = None,
                       trust_remote_code: bool = False, label: Optional[str] = None) -> VisionTower:
    """A tower of the architecture ``path`` describes, with fresh weights (a full export's shards fill them).

    Under a live ZeRO-3 config (``HfDeepSpeedConfig``) the encoder is built partitioned, as
    ``from_pretrained`` would build it.

    Args:
        path: a folder holding the tower's config.json (and, for remote code, its ``.py`` files).
        torch_dtype: dtype to build in.
        source: the ``source`` to record (default: ``path``).
        trust_remote_code: allow running the folder's Python files (remote-code towers: InternViT).
        label: how messages name the folder (default ``--vision_tower 'path'``).

    Raises:
        FileNotFoundError: ``path`` or its config.json does not exist.
        ValueError: as :func:`load_vision_tower`.
    """
    return _make_tower(path, torch_dtype, source or os.path.abspath(path), False, trust_remote_code, label)


def load_vision_tower(path: str, torch_dtype: torch.dtype = torch.float32,
                      trust_remote_code: bool = False) -> VisionTower:
    """Load a vision tower, weights included, from a local folder.

    An InternViT folder (``model_type`` ``intern_vit_6b``) runs the Python files its config's
    ``auto_map`` names, as VITA does, when ``trust_remote_code`` allows it, through
    :mod:`vitacore.model.remote_code`: without timm, although its model never calls ``post_init``,
    with its weights loaded strictly (partitioned under ZeRO-3). Other types use transformers' classes.

    Args:
        path: a folder holding a transformers ``config.json`` and weights.
        torch_dtype: dtype to load in.
        trust_remote_code: allow running the folder's Python files (``--trust_remote_code``); without it
            a remote-code folder is refused before any of its files is imported.

    Raises:
        FileNotFoundError: ``path`` or its config.json does not exist.
        ValueError: the config's ``model_type`` is not a supported tower (the message lists them), its code
            needs ``trust_remote_code`` (the message lists the files), or the folder does not load (its code
            fails, weights missing or not fitting): naming the folder, ``--vision_tower`` and what to do.
    """
    return _make_tower(path, torch_dtype, os.path.abspath(path), True, trust_remote_code, None)


def _label(path: str) -> str:
    return f"--vision_tower {path!r}"


def check_tower_trust(path: str, trust_remote_code: bool, label: Optional[str] = None) -> None:
    """Refuse a remote-code tower (InternViT) without ``trust_remote_code``; reads config.json as JSON only.

    Raises:
        FileNotFoundError / ValueError: as :func:`tower_kind`, or no consent (naming the ``.py`` files).
    """
    _, kind = tower_kind(path, label)
    if kind.remote_code:
        require_trust(path, label or _label(path), trust_remote_code)


def _make_tower(path: str, torch_dtype: torch.dtype, source: str, with_weights: bool,
                trust_remote_code: bool, label: Optional[str]) -> VisionTower:
    label = label or _label(path)
    _, kind = tower_kind(path, label)
    if kind.remote_code:
        require_trust(path, label, trust_remote_code)  # before any of the folder's files is imported
    try:
        encoder, config = _make_encoder(path, kind, torch_dtype, with_weights, trust_remote_code, label)
    except LOAD_ERRORS as err:  # the folder's problem (a RemoteCodeError is its code's): a message, not a traceback
        code = ", and the .py files its auto_map names, which run as code" if kind.remote_code else ""
        detail = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{label}: the tower does not load ({type(err).__name__}: {detail}). Check that the "
                         f"folder is complete and as released: config.json, the weights{code}; pass another "
                         "folder, or drop --vision_tower") from err
    spec = read_image_spec(path, config.image_size, kind)
    return VisionTower(encoder, kind.select_layer, kind.drop_cls, spec, source=source,
                       pixel_shuffle=kind.pixel_shuffle)


def _make_encoder(path: str, kind: TowerKind, torch_dtype: torch.dtype, with_weights: bool,
                  trust_remote_code: bool, label: str) -> tuple[nn.Module, object]:
    """The encoder and its (vision) config; fresh weights unless ``with_weights``."""
    import transformers

    config = _tower_config(path, kind, trust_remote_code, label)
    _check_grid(label, kind, config)
    if kind.remote_code:
        encoder = build_remote_model(path, config, torch_dtype, trust_remote_code, label=label)
        if with_weights:
            load_remote_weights(encoder, path, label=label)
        return encoder, config
    model_class = getattr(transformers, kind.class_name)
    if with_weights:
        return model_class.from_pretrained(path, dtype=torch_dtype), config
    return model_class._from_config(config, dtype=torch_dtype).eval(), config  # eval, as from_pretrained returns it
