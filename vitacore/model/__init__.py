"""The multimodal model: composition around any causal LM, towers, projectors, audio, LoRA / k-bit."""

from vitacore.model.audio import (
    AUDIO_CONFIG_FILE,
    AudioEncoder,
    AudioEncoderConfig,
    AudioStack,
    build_audio_encoder,
    load_audio_encoder,
    load_audio_stack,
)
from vitacore.model.audio_adapters import AudioAdapter, CnnAdapter, LinearAdapter, build_audio_adapter
from vitacore.model.build import ModelBundle, build_model, finish_model, llm_load_kwargs, load_adapter_weights
from vitacore.model.families import INFERRED_SOURCE, ModelTypeChoice, infer_model_type
from vitacore.model.loading import (
    LOAD_ERRORS,
    folder_load_errors,
    is_zero3,
    load_tokenizer_for,
    quiet_load_report,
    zero3_construction,
)
from vitacore.model.lora import apply_lora, find_lora_targets, is_quantized
from vitacore.model.multimodal import UNIT_PREFIXES, VitaModel
from vitacore.model.projector import build_projector
from vitacore.model.runtime import prepare_for_training
from vitacore.model.spec import AdapterWeights, LoraSpec, LoraWeights, ModelSpec, QuantSpec, StartWeights
from vitacore.model.vision import VisionTower, build_vision_tower, load_vision_tower
from vitacore.model.zero3_view import Zero3View, module_for_engine

__all__ = [
    "AUDIO_CONFIG_FILE", "AdapterWeights", "AudioAdapter", "AudioEncoder", "AudioEncoderConfig", "AudioStack",
    "CnnAdapter", "INFERRED_SOURCE", "LOAD_ERRORS", "LinearAdapter", "LoraSpec", "LoraWeights", "ModelBundle",
    "ModelSpec", "ModelTypeChoice", "QuantSpec", "StartWeights", "UNIT_PREFIXES", "VisionTower", "VitaModel",
    "apply_lora", "build_audio_adapter", "build_audio_encoder", "build_model", "build_projector",
    "build_vision_tower", "find_lora_targets", "finish_model", "folder_load_errors", "infer_model_type",
    "is_quantized", "is_zero3", "llm_load_kwargs", "load_adapter_weights", "load_audio_encoder", "load_audio_stack",
    "load_tokenizer_for", "load_vision_tower", "module_for_engine", "prepare_for_training", "quiet_load_report",
    "zero3_construction", "Zero3View",
]
