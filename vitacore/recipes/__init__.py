"""Recipes: the composition root of a stage run (:mod:`.stage`), its stage presets, its typed configs, its tools."""

from vitacore.recipes.model import (
    ModelPlan,
    build_model_from_config,
    build_run_model,
    model_inputs,
    plan_model,
    start_weights,
    with_model_type,
)
from vitacore.recipes.specs import RunSpecs, compute_dtype, derive_specs
from vitacore.recipes.stage import StageRecipe, recipe_main, run_all_stages, run_stage
from vitacore.recipes.stages import (
    BUILTIN_PRESETS,
    StagePreset,
    describe_sources,
    get_preset,
    load_stage_file,
    preset_summary,
    resolve_stage,
    stage_notes,
    uses_embedded_default,
)

__all__ = [
    "BUILTIN_PRESETS", "ModelPlan", "RunSpecs", "StagePreset", "StageRecipe", "build_model_from_config",
    "build_run_model", "compute_dtype", "derive_specs", "describe_sources", "get_preset", "load_stage_file",
    "model_inputs", "plan_model", "preset_summary", "recipe_main", "resolve_stage", "run_all_stages", "run_stage",
    "stage_notes", "start_weights", "uses_embedded_default", "with_model_type",
]
