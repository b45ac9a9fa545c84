"""VITA's freeze flags translated into a :class:`FreezePolicy`.

VITA applies its switches one after another and each ``tune_*`` switch first freezes the whole
model, so combining two keeps only the last. vitacore takes the union of what the flags ask to
train and refuses contradictions, naming both flags.

Translation:

- any of ``tune_mm_mlp_adapter`` (projector), ``tune_audio_mlp_adapter`` (audio adapter),
  ``audio_prompt_finetune`` (audio prompt), ``audio_state_predictor_tuning`` (state head) puts the
  run in adapter mode: the LLM is frozen and the union of those units trains;
- otherwise the LLM and the projector train (VITA's default; a model without a vision tower has no
  projector, and then only the LLM does);
- ``freeze_backbone`` freezes the LLM (all of it, lm_head included);
- ``unfreeze_vision_tower`` trains the tower; ``freeze_audio_encoder False`` the audio encoder;
  ``freeze_audio_encoder_adapter False`` the audio adapter;
- ``freeze_mm_mlp_adapter`` freezes the projector;
- ``lora_enable`` trains the LLM through LoRA adapters (mode ``lora``); ``lora_bias`` adds biases
  (``all``: every LLM bias; ``lora_only``: those of the adapted layers);
- ``trainable_regex`` / ``frozen_regex`` override per parameter (see :mod:`vitacore.freeze.policy`).
"""

from __future__ import annotations

from typing import Callable, Collection, Optional

from vitacore.freeze.policy import FreezePolicy

_TUNE_FLAGS = (
    ("tune_mm_mlp_adapter", "mm_projector"),
    ("tune_audio_mlp_adapter", "audio_adapter"),
    ("audio_prompt_finetune", "audio_prompt"),
    ("audio_state_predictor_tuning", "state_head"),
)


def _contradiction(flag_a: str, value_a, flag_b: str, value_b) -> ValueError:
    return ValueError(f"--{flag_a} {value_a} contradicts --{flag_b} {value_b}; set one of them the other way")


def policy_from_flags(get: Callable[[str], object], is_explicit: Callable[[str], bool],
                      present_units: Optional[Collection[str]] = None) -> FreezePolicy:
    """Build the policy from VITA's flags.

    Args:
        get: field name -> value (``RunConfig.get``).
        is_explicit: whether the user set the field (a default never contradicts anything).
        present_units: the units the model has (None: all); VITA's default of training the
            projector is dropped for a model without one (no vision tower). A flag that asks for an
            absent unit still fails when the policy is applied, naming the unit.

    Raises:
        ValueError: contradictory flags, naming both.
    """
    tuned = [unit for flag, unit in _TUNE_FLAGS if get(flag)]
    modes = dict.fromkeys(tuned, "full") if tuned else {"llm": "full", "mm_projector": "full"}
    if not tuned and present_units is not None and "mm_projector" not in present_units:
        del modes["mm_projector"]

    if get("tune_mm_mlp_adapter") and get("freeze_mm_mlp_adapter"):
        raise _contradiction("tune_mm_mlp_adapter", True, "freeze_mm_mlp_adapter", True)
    explicit_adapter_freeze = get("freeze_audio_encoder_adapter") and is_explicit("freeze_audio_encoder_adapter")
    if get("tune_audio_mlp_adapter") and explicit_adapter_freeze:
        raise _contradiction("tune_audio_mlp_adapter", True, "freeze_audio_encoder_adapter", True)
    if get("freeze_backbone"):
        modes.pop("llm", None)
    if get("unfreeze_vision_tower"):
        modes["vision_tower"] = "full"
    if not get("freeze_audio_encoder"):
        modes["audio_encoder"] = "full"
    if not get("freeze_audio_encoder_adapter"):
        modes["audio_adapter"] = "full"
    if get("freeze_mm_mlp_adapter"):
        modes.pop("mm_projector", None)
    if get("lora_enable"):
        # Union again: LoRA adapters train next to any tuned unit (VITA's tune_* would freeze them).
        modes["llm"] = "lora"
    return FreezePolicy(modes, trainable_regex=get("trainable_regex") or None,
                        frozen_regex=get("frozen_regex") or None,
                        lora_bias=(get("lora_bias") or "none") if get("lora_enable") else "none")


def policy_from_config(config, present_units: Optional[Collection[str]] = None) -> FreezePolicy:
    """:func:`policy_from_flags` for a ``RunConfig`` (``present_units``: the model's units, None: all)."""
    return policy_from_flags(config.get, config.is_explicit, present_units)
