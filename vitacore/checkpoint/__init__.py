"""Checkpoints and artifacts: the checkpointer, VITA's adapter files and key names, LoRA files, the full export."""

from vitacore.checkpoint.artifacts import (
    AUDIO_ADAPTER_FILE,
    MM_PROJECTOR_FILE,
    atomic_torch_save,
    read_adapter_file,
    save_stage_artifacts,
)
from vitacore.checkpoint.checkpointer import CheckpointConfig, Checkpointer
from vitacore.checkpoint.export import (
    is_full_export,
    llm_config_for,
    load_export_bundle,
    load_full_export,
    read_export_config,
    save_full_export,
)
from vitacore.checkpoint.folders import clean_partial_saves, is_ours, move_aside_newer
from vitacore.checkpoint.gather import gathered_state
from vitacore.checkpoint.lock import OutputLock
from vitacore.checkpoint.lora import (
    load_non_lora_trainables,
    lora_state_dict,
    merge_lora,
    non_lora_trainables,
    read_lora_weights,
    save_lora_artifacts,
)
from vitacore.checkpoint.resumable import (
    CheckpointMismatchError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    rotate,
    run_identity,
    save_checkpoint,
    verify_checkpoint,
)
from vitacore.checkpoint.run_artifacts import StageArtifacts, is_lora_model, needs_full_export, save_run_artifacts
from vitacore.checkpoint.run_status import RUN_STATUS_FILE, RunStatus, read_run_status
from vitacore.checkpoint.vita_layout import from_vita_name, to_vita_name
from vitacore.durable import atomic_write

__all__ = [
    "AUDIO_ADAPTER_FILE", "CheckpointConfig", "CheckpointMismatchError", "Checkpointer", "MM_PROJECTOR_FILE",
    "OutputLock", "clean_partial_saves", "is_ours", "move_aside_newer", "verify_checkpoint",
    "StageArtifacts", "atomic_torch_save", "atomic_write", "from_vita_name", "gathered_state", "is_full_export",
    "is_lora_model", "latest_checkpoint", "list_checkpoints", "llm_config_for", "load_checkpoint",
    "load_export_bundle", "load_full_export", "load_non_lora_trainables", "lora_state_dict", "merge_lora",
    "needs_full_export", "non_lora_trainables", "read_adapter_file", "read_export_config", "read_lora_weights",
    "resolve_resume", "rotate", "run_identity", "save_checkpoint", "save_full_export", "save_lora_artifacts",
    "save_run_artifacts", "save_stage_artifacts", "to_vita_name",
    "RUN_STATUS_FILE", "RunStatus", "read_run_status",
]
