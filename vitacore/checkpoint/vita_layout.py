"""VITA's parameter names at the file boundary.

vitacore's modules have clean attribute names (``llm``, ``vision_tower.encoder``, ``audio_adapter``);
VITA's checkpoints name the same tensors as one ``VITAQwen2ForCausalLM``: the LLM's own keys at the top
(``model.layers.*``, ``lm_head.*``) and the multimodal parts under ``model.``. These two functions are
the whole mapping; every file vitacore writes in VITA's layout goes through them.
"""

from __future__ import annotations

# vitacore prefix -> VITA prefix, most specific first. The LLM's keys map to themselves.
_PREFIXES = (
    ("vision_tower.encoder.", "model.vision_tower.vision_tower."),
    ("mm_projector.", "model.mm_projector."),
    ("audio_encoder.", "model.audio_encoder.encoder."),
    ("audio_adapter.", "model.audio_encoder.adpter."),
    ("audio_prompt.", "model.audio_encoder.prompt_embeddings."),
    ("state_head.", "predictor_head."),
)
# peft wraps the LLM as ``base_model.model.<llm keys>``; VITA's names never carry it outside LoRA files.
_PEFT_WRAPPER = "base_model.model."
_LORA_ADAPTER_NAME = ".default."


def to_vita_name(name: str) -> str:
    """VITA's key for a ``VitaModel`` parameter name (peft wrapper and adapter name dropped).

    >>> to_vita_name("mm_projector.0.weight")
    'model.mm_projector.0.weight'
    >>> to_vita_name("llm.base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight")
    'model.layers.0.mlp.up_proj.lora_A.weight'
    """
    for ours, theirs in _PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    if not name.startswith("llm."):
        raise ValueError(f"parameter {name!r} belongs to no known VitaModel part")
    name = name[len("llm."):]
    if name.startswith(_PEFT_WRAPPER):
        name = name[len(_PEFT_WRAPPER):]
    return name.replace(_LORA_ADAPTER_NAME, ".")


def from_vita_name(key: str) -> str:
    """The ``VitaModel`` parameter name for a VITA key (the LLM without any peft wrapper)."""
    for ours, theirs in _PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return "llm." + key


def is_llm_key(key: str) -> bool:
    """True for a VITA key that belongs to the LLM (what ``AutoModelForCausalLM`` loads)."""
    return from_vita_name(key).startswith("llm.")
