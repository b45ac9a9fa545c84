"""The full export's names, and how a folder in VITA's layout is recognised and its LLM config read.

Layout::

    config.json                  the LLM's config + VITA's multimodal fields + a "vitacore" entry
    model.safetensors            every tensor under VITA's key names (or model-0000k-of-0000n shards
    model.safetensors.index.json   + an index, HF's format)
    generation_config.json       when the LLM has one
    tokenizer files              tokenizer.save_pretrained
    vision_tower/                the tower's config.json (+ preprocessor_config.json, + the .py files
                                   of a remote-code tower such as InternViT); no weights
    audio_encoder/               the audio encoder's config (Whisper: + preprocessor_config.json); no weights

The weights of every part live in the shards; the two folders make the export self-contained, so
loading it never needs the paths the model was first built from. A VITA checkpoint has the same
config.json fields and key names, without the "vitacore" entry and the encoder folders.
"""

from __future__ import annotations

import json
import os
from typing import Optional

EXPORT_FORMAT = "vitacore-full-export"
EXPORT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROCESSOR_FILE = "preprocessor_config.json"
VISION_SUBFOLDER = "vision_tower"
AUDIO_SUBFOLDER = "audio_encoder"
MERGE_LORA_HINT = "python -m vitacore.checkpoint merge-lora"

# VITA's own model types -> the transformers family whose weights they hold.
VITA_MODEL_TYPES = {"vita-Qwen2": "qwen2", "vita-fo-Qwen2": "qwen2", "vita-Mistral": "mistral",
                    "vita-mixtral": "mixtral"}
# VITA's multimodal config fields (VITA_REFERENCE §8); they describe the model, not the LLM.
MULTIMODAL_FIELDS = (
    "mm_vision_tower", "mm_audio_encoder", "mm_projector_type", "mm_hidden_size", "use_mm_proj",
    "image_aspect_ratio", "tokenizer_padding_side", "tokenizer_model_max_length", "freeze_audio_encoder",
    "freeze_audio_encoder_adapter", "audio_prompt_finetune", "audio_prompt_num", "tune_mm_mlp_adapter",
    "tune_audio_mlp_adapter", "audio_state_predictor_tuning", "freeze_mm_mlp_adapter", "mm_projector_lr",
    "use_s2", "unfreeze_vision_tower",
)
PROMPT_KEY = "model.audio_encoder.prompt_embeddings.weight"
STATE_HEAD_PREFIX = "predictor_head."
ADAPTER_CONV_KEY = "model.audio_encoder.adpter.conv1d2.weight"


def read_export_config(path: Optional[str]) -> Optional[dict]:
    """``path``'s config.json when it describes a whole VITA-layout model (it has ``mm_vision_tower``
    or a ``vitacore`` entry); None for a plain LLM folder, a hub id, or nothing."""
    if not path or not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return None
    with open(os.path.join(path, CONFIG_FILE)) as fh:
        config = json.load(fh)
    return config if "mm_vision_tower" in config or isinstance(config.get("vitacore"), dict) else None


def is_full_export(directory: str) -> bool:
    """True when ``directory`` holds a vitacore full export (its config.json has a "vitacore" entry)."""
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as fh:
            return isinstance(json.load(fh).get("vitacore"), dict)
    except (OSError, ValueError):
        return False


def llm_config_for(path: str, exported: Optional[dict] = None):
    """The LLM's transformers config for ``path`` (a plain LLM folder or a VITA-layout one); VITA's
    model types map to their family and the multimodal fields are left out.

    Args:
        path: the folder.
        exported: its config.json when the caller has read it already (:func:`read_export_config`).
    """
    from transformers import AutoConfig

    exported = exported if exported is not None else read_export_config(path)
    if exported is not None and exported.get("model_type") in VITA_MODEL_TYPES:
        fields = {k: v for k, v in exported.items() if k != "model_type"}
        config = AutoConfig.for_model(VITA_MODEL_TYPES[exported["model_type"]], **fields)
    else:
        config = AutoConfig.from_pretrained(path)
    for key in (*MULTIMODAL_FIELDS, "vitacore"):  # the model's fields, kept on VitaModel.mm_config
        if key in config.__dict__:
            delattr(config, key)
    return config
