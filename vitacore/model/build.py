"""Compose the multimodal model from an LLM folder, a tower folder and an audio encoder folder.

A folder in VITA's layout (a full export or a VITA checkpoint), which holds every part at once, is
read by :mod:`vitacore.checkpoint.export`; both paths end in :func:`finish_model`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from vitacore.model.audio import load_audio_stack
from vitacore.model.families import attention_implementation
from vitacore.model.loading import folder_load_errors, load_tokenizer_for, zero3_construction
from vitacore.model.lora import apply_lora, kbit_load_kwargs
from vitacore.model.multimodal import VitaModel
from vitacore.model.projector import build_projector
from vitacore.model.spec import AdapterWeights, ModelSpec, StartWeights
from vitacore.model.vision import load_vision_tower


@dataclass
class ModelBundle:
    """The model and the tokenizer its data must be tokenized with."""

    model: VitaModel
    tokenizer: object


def llm_load_kwargs(spec: ModelSpec) -> dict:
    """``from_pretrained`` arguments of the LLM: attention implementation and k-bit quantization
    (``--bits 4/8`` quantize the LLM only; every other part loads in ``spec.dtype``)."""
    return {"attn_implementation": attention_implementation(spec.dtype),
            **kbit_load_kwargs(spec.quant, spec.dtype, spec.lora is not None)}


def load_adapter_weights(module: nn.Module, weights: AdapterWeights) -> None:
    """Load a saved adapter into ``module`` strictly: every key present, every shape equal.

    Raises:
        ValueError: naming the file (``weights.origin``), the key and both shapes.
    """
    expected = module.state_dict()
    for key, value in weights.state.items():
        if key in expected and expected[key].shape != value.shape:
            raise ValueError(f"{weights.origin}: {weights.key_marker}{key} has shape {tuple(value.shape)} but this "
                             f"model needs {tuple(expected[key].shape)}; the file was trained for another tower/LLM")
    # VITA's adapter files hold parameters only: buffers (BatchNorm statistics) may be absent and keep their values.
    missing = set(dict(module.named_parameters())) - set(weights.state)
    unexpected = set(weights.state) - set(expected)
    if missing or unexpected:
        raise ValueError(f"{weights.origin}: keys do not fit (missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)})")
    module.load_state_dict(weights.state, strict=False)


def finish_model(model: VitaModel, spec: ModelSpec, start: StartWeights) -> VitaModel:
    """The steps after every part exists: start adapters, then LoRA (which wraps the LLM only).

    Raises:
        ValueError: start weights for a part the model does not have, or that do not fit it.
    """
    for weights, module, part in ((start.mm_projector, model.mm_projector, "vision tower (--vision_tower)"),
                                  (start.audio_adapter, model.audio_adapter, "audio encoder (--audio_encoder)")):
        if weights is None:
            continue
        if module is None:
            raise ValueError(f"{weights.origin}: the run has no {part}, so there is nothing to load this adapter "
                             "into; give the part, or drop the adapter flag")
        load_adapter_weights(module, weights)
    if spec.lora is not None:
        apply_lora(model, spec.lora, spec.dtype, spec.gradient_checkpointing, start.lora)
    return model


def build_model(spec: ModelSpec, start: StartWeights | None = None, deepspeed_config: dict | None = None
                ) -> ModelBundle:
    """LLM + vision tower + projector + audio encoder + adapter (+ prompt, state head) for ``spec``.

    A part without a path is absent (no tower: no projector; no audio encoder: no adapter), and so
    is its modality: a run never takes a stand-in part it was not given.

    Start adapters are loaded here, before any engine partitions the modules (DeepSpeed broadcasts
    rank 0's values then).

    Args:
        spec: the model's config (a folder in VITA's layout goes through
            vitacore.checkpoint.load_export_bundle instead).
        start: adapter / LoRA weights to start from, already read from their files.
        deepspeed_config: the complete DeepSpeed config; with ZeRO-3 the transformers models are built
            partitioned (each rank holds only its shard from the start).

    Raises:
        ValueError: audio prompts without an audio encoder, or start weights that do not fit.
    """
    from transformers import AutoModelForCausalLM

    if spec.audio_prompt_finetune and not spec.audio_encoder_path:
        raise ValueError("--audio_prompt_finetune True trains prompts that open every audio clip, but the run has "
                         "no --audio_encoder; give one, or drop the flag")
    dtype = spec.dtype
    tokenizer = load_tokenizer_for(spec.llm_path, spec.model_max_length, spec.model_type)
    with zero3_construction(deepspeed_config):
        with folder_load_errors("--model_name_or_path", spec.llm_path, "the LLM"):
            llm = AutoModelForCausalLM.from_pretrained(spec.llm_path, dtype=dtype, **llm_load_kwargs(spec))
        llm.config.use_cache = False
        vision_tower = (load_vision_tower(spec.vision_tower_path, torch_dtype=dtype,
                                          trust_remote_code=spec.trust_remote_code)
                        if spec.vision_tower_path else None)
    hidden = llm.config.hidden_size

    # New modules get their initial values from the run's seed, so reruns start identically.
    torch.manual_seed(spec.seed)
    projector = None
    if vision_tower is not None:
        projector = build_projector(spec.mm_projector_type, vision_tower.hidden_size, hidden).to(dtype)
    audio_encoder = audio_adapter = audio_prompt = None
    if spec.audio_encoder_path:
        # Not partitioned under ZeRO-3 (built outside the construction context), like the tiny encoder.
        with folder_load_errors("--audio_encoder", spec.audio_encoder_path, "the audio encoder"):
            stack = load_audio_stack(spec.audio_encoder_path, dtype, hidden)
        audio_encoder, audio_adapter = stack.encoder, stack.adapter
        if spec.audio_prompt_finetune or spec.audio_prompt_num:
            audio_prompt = torch.nn.Embedding(spec.audio_prompt_num, hidden).to(dtype)
            if stack.prompt_state is not None:  # VITA's final.pt may carry trained prompts
                load_adapter_weights(audio_prompt, AdapterWeights(
                    stack.prompt_state, f"--audio_encoder {spec.audio_encoder_path!r} (final.pt)",
                    "prompt_embeddings."))
    # VITA's fo model: a 3-class user-state head on the last hidden state.
    state_head = torch.nn.Linear(hidden, 3).to(dtype) if spec.model_type == "qwen2p5_fo_instruct" else None

    mm_config = {
        "mm_vision_tower": vision_tower.source if vision_tower is not None else None,
        "mm_audio_encoder": audio_encoder.source if audio_encoder is not None else None,
        "mm_projector_type": spec.mm_projector_type,
        "mm_hidden_size": vision_tower.hidden_size if vision_tower is not None else None,
        "use_mm_proj": True,
        "image_aspect_ratio": spec.image_aspect_ratio,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": spec.model_max_length,
        "audio_prompt_finetune": spec.audio_prompt_finetune,
        "audio_prompt_num": spec.audio_prompt_num,
    }
    model = VitaModel(llm, vision_tower, projector, audio_encoder, audio_adapter, audio_prompt, state_head,
                      model_max_length=spec.model_max_length, padding_side="right", mm_config=mm_config,
                      loss_chunk_size=spec.loss_chunk_size)
    return ModelBundle(finish_model(model, spec, start or StartWeights()), tokenizer)
