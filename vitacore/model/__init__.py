"""The multimodal model: composition around any causal LM, towers, projectors, audio, defaults."""

from vitacore.model.build import ModelBundle, build_model, llm_hidden_size, uses_embedded_default
from vitacore.model.lora import apply_lora, find_lora_targets
from vitacore.model.multimodal import UNIT_PREFIXES, VitaModel
from vitacore.model.projector import build_projector

__all__ = ["ModelBundle", "UNIT_PREFIXES", "VitaModel", "apply_lora", "build_model", "find_lora_targets", "build_projector", "llm_hidden_size",
           "uses_embedded_default"]
