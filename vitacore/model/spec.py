"""What the model builders receive: the model's own typed config, and start weights already read.

A run derives one :class:`ModelSpec` from its flags (``vitacore.recipes``); a script may write one
by hand. Weight files are opened by :mod:`vitacore.checkpoint`, which hands the builders state dicts
(:class:`AdapterWeights`, :class:`LoraWeights`): the model package never reads an adapter file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters on the LLM (``--lora_*``)."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    bias: str = "none"
    target_modules: str = ""  # comma-separated; empty: every Linear of the LLM except the output head


@dataclass(frozen=True)
class QuantSpec:
    """Loading the LLM in 4 / 8 bits with bitsandbytes (``--bits``, ``--quant_type``, ``--double_quant``)."""

    bits: int = 16
    quant_type: str = "nf4"
    double_quant: bool = True


@dataclass(frozen=True)
class ModelSpec:
    """Everything the builders need to compose the model.

    Attributes:
        llm_path: the LLM folder, or a folder in VITA's layout (a full export / VITA checkpoint)
            holding every part.
        vision_tower_path: the tower folder. With a VITA-layout ``llm_path``: an override of the
            encoder config the folder records (None: the folder's own).
        audio_encoder_path: as ``vision_tower_path``, for the audio encoder.
        mm_projector_type: ``linear``, ``identity`` or ``mlpNx_gelu``.
        model_type: VITA's ``--model_type`` (pad rule; ``qwen2p5_fo_instruct`` adds the state head).
        audio_prompt_finetune / audio_prompt_num: learnable audio prompt embeddings.
        dtype: the compute dtype every part is built in.
        model_max_length: longest sequence after media expansion.
        seed: seeds the initial values of the parts the run creates (projector, adapter, ...).
        image_aspect_ratio: recorded in the multimodal config (``--image_aspect_ratio``).
        lora: LoRA on the LLM, or None.
        quant: k-bit loading of the LLM.
        gradient_checkpointing: recompute the LLM's activations in backward.
        tf32: allow TF32 matmuls (NVIDIA GPUs only).
        trust_remote_code: allow running the Python files of a tower folder whose config.json has an
            ``auto_map`` (InternViT); without it such a folder is refused.
        loss_chunk_size: supervised positions per chunk of the chunked output head + loss (0: the
            LLM's own full logits).
    """

    llm_path: str
    vision_tower_path: Optional[str] = None
    audio_encoder_path: Optional[str] = None
    mm_projector_type: str = "mlp2x_gelu"
    model_type: Optional[str] = None
    audio_prompt_finetune: bool = False
    audio_prompt_num: Optional[int] = None
    dtype: torch.dtype = torch.float32
    model_max_length: int = 512
    seed: int = 42
    image_aspect_ratio: Optional[str] = None
    lora: Optional[LoraSpec] = None
    quant: QuantSpec = field(default_factory=QuantSpec)
    gradient_checkpointing: bool = False
    tf32: Optional[bool] = None
    trust_remote_code: bool = False
    loss_chunk_size: int = 1024


@dataclass(frozen=True)
class AdapterWeights:
    """A saved adapter's tensors, keyed relative to the module they fill.

    Attributes:
        state: ``{local name: tensor}`` (``0.weight`` for ``mm_projector.0.weight``).
        origin: how errors name the file, e.g. ``--pretrain_mm_mlp_adapter '/runs/mm_projector.bin'``.
        key_marker: the key part stripped from the file's names (``mm_projector.``), for messages.
    """

    state: dict
    origin: str
    key_marker: str


@dataclass(frozen=True)
class LoraWeights:
    """A saved PEFT adapter: its tensors (peft's file keys) and the ``adapter_config.json`` it came with.

    Attributes:
        state: peft's saved keys -> tensors.
        saved_config: the adapter's config as written (None: the folder had none).
        origin: how errors name the folder (``--lora_weight_path '/runs/lora'``).
    """

    state: dict
    saved_config: Optional[dict]
    origin: str


@dataclass(frozen=True)
class StartWeights:
    """Weights some parts start from instead of their initial values (each None: none given)."""

    mm_projector: Optional[AdapterWeights] = None
    audio_adapter: Optional[AdapterWeights] = None
    lora: Optional[LoraWeights] = None
