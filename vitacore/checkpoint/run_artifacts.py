"""Which artifacts a run writes, by what it trains: one decision for checkpoints and the final save."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from vitacore.checkpoint.artifacts import save_stage_artifacts
from vitacore.checkpoint.export.writer import save_full_export
from vitacore.checkpoint.lora import save_lora_artifacts

# Units whose weights fit in VITA's small adapter files; training anything else in full needs a full export.
_ADAPTER_UNITS = {"mm_projector", "audio_adapter"}


def is_lora_model(model: nn.Module) -> bool:
    """True when the model's LLM is wrapped by peft."""
    llm = getattr(model, "llm", None)
    return llm is not None and hasattr(llm, "peft_config")


def needs_full_export(trained_units: set[str], lora: bool) -> bool:
    """A full export is the only artifact that holds what a run trained outside the adapters.

    LoRA runs train the LLM through the adapter folder instead; their other trained units go to
    ``non_lora_trainables.bin``.
    """
    if lora:
        return False
    return bool(set(trained_units) - _ADAPTER_UNITS)


def save_run_artifacts(model: nn.Module, directory: str, trained_units: set[str], is_main: bool,
                       tokenizer=None, lora_bias: str = "none", full_export: bool = False,
                       export_dtype: Optional[torch.dtype] = torch.bfloat16) -> dict[str, str]:
    """Write the artifacts of a stage into ``directory``; every rank calls this (ZeRO-3 gathers).

    - ``mm_projector.bin`` / ``audio_adpter.bin`` for a trained projector / audio adapter;
    - for LoRA runs, the PEFT adapter folder files and ``non_lora_trainables.bin``;
    - with ``full_export`` and a run that trained more than the adapters: a full export
      (``config.json``, ``model*.safetensors``, the tokenizer) in ``export_dtype``.

    Returns:
        ``{artifact name: path}``.
    """
    written = save_stage_artifacts(model, directory, set(trained_units), is_main)
    lora = is_lora_model(model)
    if lora:
        written.update(save_lora_artifacts(model, directory, lora_bias, is_main))
    if full_export and tokenizer is not None and needs_full_export(trained_units, lora):
        written.update(save_full_export(model, tokenizer, directory, is_main, dtype=export_dtype))
    return written


@dataclass(frozen=True)
class StageArtifacts:
    """What a stage writes beside its checkpoints and at its end, by what it trains.

    Attributes:
        model: the model being trained (not the engine).
        trained_units: the units the freeze policy trains.
        tokenizer: saved with a full export (None: no full export is written).
        lora_bias: which biases the LoRA adapter file carries (``--lora_bias``).
        export_dtype: precision of a full export's floating tensors.
    """

    model: nn.Module
    trained_units: frozenset
    tokenizer: object = None
    lora_bias: str = "none"
    export_dtype: Optional[torch.dtype] = torch.bfloat16

    def write(self, directory: str, is_main: bool, final: bool = False) -> dict[str, str]:
        """:func:`save_run_artifacts` into ``directory``; ``final`` adds the full export where one is due.

        Every rank calls this (ZeRO-3 gathers); ``is_main`` writes.
        """
        return save_run_artifacts(self.model, directory, set(self.trained_units), is_main, tokenizer=self.tokenizer,
                                  lora_bias=self.lora_bias, full_export=final, export_dtype=self.export_dtype)
