"""Checkpoints and stage artifacts (VITA's file and key names)."""

from vitacore.checkpoint.artifacts import (
    AUDIO_ADAPTER_FILE, MM_PROJECTOR_FILE, atomic_torch_save, load_adapter_file, save_stage_artifacts,
)
from vitacore.checkpoint.gather import gathered_state
from vitacore.checkpoint.export import is_full_export, load_full_export, save_full_export
from vitacore.checkpoint.lora import (
    load_non_lora_trainables, lora_state_dict, merge_lora, non_lora_trainables, save_lora_artifacts,
)
from vitacore.checkpoint.resumable import (
    CheckpointMismatchError, latest_checkpoint, list_checkpoints, load_checkpoint, resolve_resume, rotate,
    save_checkpoint,
)
from vitacore.checkpoint.run_artifacts import is_lora_model, needs_full_export, save_run_artifacts

__all__ = [
    "AUDIO_ADAPTER_FILE", "MM_PROJECTOR_FILE", "atomic_torch_save", "gathered_state",
    "load_adapter_file", "save_stage_artifacts",
    "is_full_export", "load_full_export", "save_full_export",
    "CheckpointMismatchError", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "resolve_resume", "rotate",
    "save_checkpoint", "is_lora_model", "needs_full_export", "save_run_artifacts",
    "load_non_lora_trainables", "lora_state_dict", "merge_lora", "non_lora_trainables", "save_lora_artifacts",
]
