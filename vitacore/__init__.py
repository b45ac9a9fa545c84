"""vitacore: staged multimodal (vision + audio + language) LLM training on an explicit DeepSpeed engine.

A stage run, composed in one place (:mod:`vitacore.recipes.stage`)::

    recipe = vitacore.StageRecipe(vitacore.parse_args(["--stage", "1"]))   # VITA's flags, presets
    recipe.setup()                     # model -> freeze policy -> param groups -> data -> checkpointer -> Trainer
    recipe.cleanup(recipe.train())     # fit, then the final artifacts

Your own model and data on the same engine, without the flag parser::

    trainer = vitacore.Trainer(model, groups, dataset, collate, vitacore.init_distributed(),
                               loop=vitacore.LoopConfig(...), optim=vitacore.OptimConfig(...),
                               deepspeed_config=..., checkpointer=vitacore.Checkpointer(...))
    trainer.fit()
"""

from vitacore._version import __version__
from vitacore.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointMismatchError,
    StageArtifacts,
    latest_checkpoint,
    load_full_export,
    save_full_export,
    save_run_artifacts,
    save_stage_artifacts,
)
from vitacore.config import (
    ConfigError,
    DataArguments,
    ModelArguments,
    RunConfig,
    TrainingArguments,
    load_yaml_config,
    parse_args,
    validate,
)
from vitacore.console import enable_console, logger
from vitacore.data import DataBundle, DataSpec, build_data
from vitacore.demo import SyntheticSelection, ensure_default_assets
from vitacore.engine import (
    DistInfo,
    LoopConfig,
    NonFiniteLossError,
    OptimConfig,
    Trainer,
    TrainResult,
    init_distributed,
    resolve_deepspeed_config,
)
from vitacore.freeze import (
    FreezePolicy,
    build_param_groups,
    build_report,
    format_report,
    param_groups_for_run,
    policy_from_config,
    unit_learning_rates,
)
from vitacore.model import (
    UNIT_PREFIXES,
    ModelBundle,
    ModelSpec,
    VitaModel,
    apply_lora,
    build_model,
    find_lora_targets,
    prepare_for_training,
)
from vitacore.recipes import (
    RunSpecs,
    StagePreset,
    StageRecipe,
    derive_specs,
    describe_sources,
    get_preset,
    recipe_main,
    resolve_stage,
    run_all_stages,
    run_stage,
    stage_notes,
    uses_embedded_default,
)

__all__ = [
    "CheckpointConfig", "CheckpointMismatchError", "Checkpointer", "ConfigError", "DataArguments", "DataBundle",
    "DataSpec", "DistInfo", "FreezePolicy", "LoopConfig", "ModelArguments", "ModelBundle", "ModelSpec",
    "NonFiniteLossError", "OptimConfig", "RunConfig", "RunSpecs", "StageArtifacts", "StagePreset", "StageRecipe",
    "SyntheticSelection", "TrainResult", "Trainer", "TrainingArguments", "UNIT_PREFIXES", "VitaModel", "__version__",
    "apply_lora", "build_data", "build_model", "build_param_groups", "build_report", "derive_specs",
    "describe_sources", "enable_console", "ensure_default_assets", "find_lora_targets", "format_report", "get_preset",
    "init_distributed", "latest_checkpoint", "load_full_export", "load_yaml_config", "logger", "param_groups_for_run",
    "parse_args", "policy_from_config", "prepare_for_training", "recipe_main", "resolve_deepspeed_config",
    "resolve_stage", "run_all_stages", "run_stage", "save_full_export", "save_run_artifacts", "save_stage_artifacts",
    "stage_notes", "unit_learning_rates", "uses_embedded_default", "validate",
]
