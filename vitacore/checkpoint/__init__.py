"""Checkpoints and stage artifacts (VITA's file and key names)."""

from vitacore.checkpoint.artifacts import (
    AUDIO_ADAPTER_FILE, MM_PROJECTOR_FILE, atomic_torch_save, load_adapter_file, save_stage_artifacts,
)
from vitacore.checkpoint.gather import gathered_state

__all__ = [
    "AUDIO_ADAPTER_FILE", "MM_PROJECTOR_FILE", "atomic_torch_save", "gathered_state",
    "load_adapter_file", "save_stage_artifacts",
]
