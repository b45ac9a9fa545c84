"""Build the multimodal model for a run: the user's checkpoints by path, or the embedded default."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from vitacore.checkpoint.artifacts import load_adapter_file
from vitacore.model.audio import AudioAdapter, audio_transform_for, load_audio_encoder
from vitacore.model.default import DefaultAssets, ensure_default_assets
from vitacore.model.families import apply_pad_rule, attention_implementation, resolve_model_type
from vitacore.model.load_export import llm_config_for, load_export_model, read_export_config
from vitacore.model.lora import apply_lora, kbit_load_kwargs
from vitacore.model.multimodal import VitaModel
from vitacore.model.projector import build_projector
from vitacore.model.vision import load_vision_tower


@contextlib.contextmanager
def _zero3_construction(deepspeed_config: Optional[dict]):
    """While active, transformers builds models inside ``deepspeed.zero.Init`` (partitioned).

    ``HfDeepSpeedConfig`` is a weak global: it must be held in a variable for the whole build, or
    every rank silently loads the full model.
    """
    if deepspeed_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_deepspeed

    previous = hf_deepspeed._hf_deepspeed_config_weak_ref  # e.g. a live TrainingArguments(deepspeed=...)
    keep_alive = HfDeepSpeedConfig(deepspeed_config)
    try:
        yield
    finally:
        del keep_alive
        hf_deepspeed._hf_deepspeed_config_weak_ref = previous


def _load_pretrained_parts(llm_path: str, tower_path: str, dtype: torch.dtype, training=None, log=print):
    from transformers import AutoModelForCausalLM

    # --bits 4/8 quantize the LLM only; towers, projector and audio parts always load in `dtype`.
    quantization = kbit_load_kwargs(training) if training is not None else {}
    attention = attention_implementation(dtype, log)
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype, attn_implementation=attention, **quantization)
    llm.config.use_cache = False
    return llm, load_vision_tower(tower_path, torch_dtype=dtype)


@dataclass
class ModelBundle:
    """The model and what the data pipeline needs to feed it."""

    model: VitaModel
    tokenizer: object
    default_assets: Optional[DefaultAssets]
    # What the data pipeline turns audio files into for this model's encoder (None: no audio encoder).
    audio_transform: Optional[object] = None


def uses_embedded_default(config) -> bool:
    """True when no model, tower, encoder or training data is given: the demo model, data and settings.

    With the user's data but no model paths, this is False (the stage's VITA settings apply) while
    :func:`build_model` still fills the missing parts with the tiny default model.
    """
    m, d = config.model, config.data
    return not (m.model_name_or_path or m.vision_tower or m.audio_encoder or d.dataset_use or d.data_path)


def compute_dtype(training) -> torch.dtype:
    """The dtype the precision flags ask for."""
    return torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32


def load_tokenizer_for(path: str, model_max_length: int, model_type: Optional[str] = None, log=print):
    """The LLM's tokenizer, right-padded, with a pad token by VITA's rule (see
    :func:`vitacore.model.families.apply_pad_rule`: none -> unk, else eos; ``llama3-8b``: eos)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=model_max_length, padding_side="right",
                                              use_fast=True, local_files_only=os.path.isdir(path))
    return apply_pad_rule(tokenizer, model_type, path, log)


def _default_assets_if_needed(config, log=print) -> Optional[DefaultAssets]:
    m = config.model
    if m.model_name_or_path and m.vision_tower and m.audio_encoder:
        return None
    return ensure_default_assets(log=log)


def llm_hidden_size(config, log=print) -> int:
    """The LLM's hidden size, read from its config without loading weights (sizes DeepSpeed buckets)."""
    path = config.model.model_name_or_path or _default_assets_if_needed(config, log).llm
    return llm_config_for(path).hidden_size  # VITA checkpoints' model types included


def _build_from_export(config, exported: dict, log, deepspeed_config: Optional[dict]) -> ModelBundle:
    """The whole model from a folder in VITA's layout (see :mod:`vitacore.model.load_export`)."""
    t, path = config.training, config.model.model_name_or_path
    resolve_model_type(config, exported.get("model_type"), path, log)
    tokenizer = load_tokenizer_for(path, t.model_max_length, config.model.model_type, log)
    zero3 = bool(deepspeed_config) and deepspeed_config.get("zero_optimization", {}).get("stage") == 3
    with _zero3_construction(deepspeed_config if zero3 else None):
        model = load_export_model(config, path, exported, compute_dtype(t), log, llm_kwargs=kbit_load_kwargs(t))
    if t.lora_enable:
        apply_lora(model, t)  # as on the path below
    transform = audio_transform_for(model.audio_encoder) if model.audio_encoder is not None else None
    return ModelBundle(model, tokenizer, None, transform)


def build_model(config, log=print, deepspeed_config: Optional[dict] = None) -> ModelBundle:
    """Compose LLM + vision tower + projector + audio encoder + adapter for ``config``.

    Paths not given fall back to the embedded default's parts (built and cached on first use).
    A ``--model_name_or_path`` folder in VITA's layout (a vitacore full export, or a VITA checkpoint:
    its config.json has ``mm_vision_tower``) gives every part, weights included.
    ``--model_type`` / ``--version`` the user did not set are inferred from the LLM's config first
    (:func:`vitacore.model.families.resolve_model_type`; ``config`` is updated and the log says so).
    Adapter weights (``--pretrain_mm_mlp_adapter`` / ``--pretrain_audio_mlp_adapter``) are loaded
    here, before any engine partitions the modules (DeepSpeed broadcasts rank 0's values then).

    Args:
        config: the run config.
        log: where progress messages go.
        deepspeed_config: the complete DeepSpeed config; with ZeRO-3 the transformers models are
            built partitioned (each rank holds only its shard from the start).
    """
    m, t = config.model, config.training
    exported = read_export_config(m.model_name_or_path)
    if exported is not None:  # a vitacore full export or a VITA checkpoint: every part is in it
        return _build_from_export(config, exported, log, deepspeed_config)
    assets = _default_assets_if_needed(config, log)
    llm_path = m.model_name_or_path or assets.llm
    dtype = compute_dtype(t)
    resolve_model_type(config, llm_config_for(llm_path).model_type, llm_path, log)
    tokenizer = load_tokenizer_for(llm_path, t.model_max_length, m.model_type, log)
    zero3 = bool(deepspeed_config) and deepspeed_config.get("zero_optimization", {}).get("stage") == 3
    with _zero3_construction(deepspeed_config if zero3 else None):
        llm, vision_tower = _load_pretrained_parts(llm_path, m.vision_tower or assets.vision_tower, dtype, t, log)
    hidden = llm.config.hidden_size

    # New modules get their initial values from the run's seed, so reruns start identically.
    torch.manual_seed(t.seed)
    projector = build_projector(m.mm_projector_type, vision_tower.hidden_size, hidden).to(dtype)
    if m.pretrain_mm_mlp_adapter:
        load_adapter_file(m.pretrain_mm_mlp_adapter, projector, "mm_projector.", "--pretrain_mm_mlp_adapter")

    # Not partitioned under ZeRO-3 (built outside the construction context), like the tiny encoder.
    audio_encoder = load_audio_encoder(m.audio_encoder or assets.audio_encoder, dtype, log)
    audio_adapter = AudioAdapter(audio_encoder.hidden_size, hidden).to(dtype)
    if m.pretrain_audio_mlp_adapter:
        load_adapter_file(m.pretrain_audio_mlp_adapter, audio_adapter, "audio_encoder.adpter.",
                          "--pretrain_audio_mlp_adapter")

    audio_prompt = None
    if m.audio_prompt_finetune or m.audio_prompt_num:
        audio_prompt = torch.nn.Embedding(m.audio_prompt_num, hidden).to(dtype)
    # VITA's fo model: a 3-class user-state head on the last hidden state.
    state_head = torch.nn.Linear(hidden, 3).to(dtype) if m.model_type == "qwen2p5_fo_instruct" else None

    mm_config = {
        "mm_vision_tower": vision_tower.source,
        "mm_audio_encoder": getattr(audio_encoder, "source", m.audio_encoder),
        "mm_projector_type": m.mm_projector_type,
        "mm_hidden_size": vision_tower.hidden_size,
        "use_mm_proj": True,
        "image_aspect_ratio": config.data.image_aspect_ratio,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": t.model_max_length,
        "audio_prompt_finetune": m.audio_prompt_finetune,
        "audio_prompt_num": m.audio_prompt_num,
    }
    model = VitaModel(llm, vision_tower, projector, audio_encoder, audio_adapter, audio_prompt, state_head,
                      model_max_length=t.model_max_length, padding_side="right", mm_config=mm_config)
    if t.lora_enable:
        apply_lora(model, t)  # last: LoRA wraps the LLM only; the freeze policy then sets what trains
    return ModelBundle(model, tokenizer, assets, audio_transform_for(audio_encoder))
