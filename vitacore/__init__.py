"""vitacore: staged multimodal (vision + audio + language) LLM training on an explicit DeepSpeed engine.

A run reads top to bottom::

    config = vitacore.parse_args()                     # VITA's flags, --config YAML
    stage = vitacore.apply_stage(config, ...)          # preset defaults + freeze policy
    dist = vitacore.init_distributed()
    bundle = vitacore.build_model(config)              # LLM + tower + projector + audio
    stage.policy.apply(bundle.model, vitacore.UNIT_PREFIXES)
    data = vitacore.build_data(config, bundle, stage.key)
    result = vitacore.Trainer(config, bundle.model, groups, data.train, data.collator, dist, data.eval).fit()
    vitacore.save_stage_artifacts(bundle.model, config.training.output_dir, ...)
"""

from vitacore.checkpoint import (
    CheckpointMismatchError, latest_checkpoint, load_adapter_file, save_run_artifacts, save_stage_artifacts,
)
from vitacore.checkpoint.export import load_full_export, save_full_export
from vitacore.config import (
    ConfigError, DataArguments, ModelArguments, RunConfig, TrainingArguments, load_yaml_config, parse_args,
    parse_unit_lr, validate,
)
from vitacore.data.build import DataBundle, SyntheticSelection, build_data
from vitacore.engine import (
    DistInfo, NonFiniteLossError, Trainer, TrainResult, init_distributed, resolve_deepspeed_config,
)
from vitacore.freeze import (
    FreezePolicy, build_param_groups, build_report, format_report, param_groups_for_run, policy_from_config,
    unit_learning_rates,
)
from vitacore.model import (
    UNIT_PREFIXES, ModelBundle, VitaModel, apply_lora, build_model, find_lora_targets, llm_hidden_size,
    uses_embedded_default,
)
from vitacore.stages import StagePreset, apply_stage, describe_sources, get_preset, stage_notes

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataArguments", "DataBundle", "DistInfo", "FreezePolicy", "ModelArguments", "ModelBundle", "NonFiniteLossError",
    "RunConfig", "StagePreset", "SyntheticSelection", "Trainer", "TrainResult", "TrainingArguments", "UNIT_PREFIXES", "VitaModel",
    "apply_stage", "build_data", "describe_sources", "build_model", "build_param_groups", "build_report", "format_report",
    "get_preset", "init_distributed", "llm_hidden_size", "resolve_deepspeed_config", "parse_unit_lr", "stage_notes", "policy_from_config", "unit_learning_rates", "load_adapter_file", "load_yaml_config", "param_groups_for_run", "parse_args",
    "save_stage_artifacts", "uses_embedded_default", "validate",
    "CheckpointMismatchError", "latest_checkpoint", "save_run_artifacts",
    "load_full_export", "save_full_export",
    "apply_lora", "find_lora_targets",
]
