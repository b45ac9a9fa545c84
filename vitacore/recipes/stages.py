"""Stage presets: config defaults from VITA's stage scripts; the freeze policy follows the flags.

A preset fills only values the user did not set (flags and ``--config`` YAML always win);
:func:`resolve_stage` returns a new config with those values, each recorded in its
``field_sources`` so the report can say where it came from. The
freeze policy is then derived from the (VITA) flags, so ``--stage 1 --unfreeze_vision_tower True``
trains the projector and the tower, and ``--stage 1 --freeze_mm_mlp_adapter True`` is refused.
With the embedded default, a few values are tuned for the tiny model so each stage learns in about
a minute, and adapters written by an earlier demo stage are picked up; those are recorded too.
Users add stages in YAML (``--stage_file``, see :func:`load_stage_file`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

import yaml

from vitacore.config import RunConfig
from vitacore.demo import SyntheticSelection


@dataclass(frozen=True)
class StagePreset:
    """A named stage.

    Attributes:
        key: canonical short name (``"1"``).
        name: descriptive alias (``"pretrain_mlp"``).
        script: where the defaults come from (a VITA script, or a YAML file).
        trains: what the stage trains, in words (for ``--help`` and the README).
        defaults: config field -> value.
        demo_defaults: values used instead with the embedded default model.
        demo_data: synthetic subsets the embedded demo trains and evaluates on.
        inputs: flag -> (earlier stage key, file) picked up from that stage's demo output.
        loads: what the stage expects from the previous stage, in words.
    """

    key: str
    name: str
    script: str
    trains: str
    defaults: Mapping[str, object]
    demo_defaults: Mapping[str, object] = field(default_factory=dict)
    demo_data: SyntheticSelection = SyntheticSelection()
    inputs: Mapping[str, tuple] = field(default_factory=dict)
    loads: str = ""


_VITA_COMMON = {
    "model_type": "qwen2p5_instruct", "version": "qwen2p5_instruct", "mm_projector_type": "mlp2x_gelu",
    "image_aspect_ratio": "square", "lr_scheduler_type": "cosine", "warmup_ratio": 0.03, "weight_decay": 0.0,
    "num_train_epochs": 1.0, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
    "model_max_length": 6200, "save_strategy": "steps", "save_steps": 500, "save_total_limit": 1,
    "logging_steps": 1, "gradient_checkpointing": True,
}
_AUDIO_FROZEN = {"freeze_audio_encoder": True, "freeze_audio_encoder_adapter": True}
_DEMO_COMMON = {
    "gradient_accumulation_steps": 1, "model_max_length": 512, "logging_steps": 10,
    "per_device_eval_batch_size": 32, "gradient_checkpointing": False, "output_dir": "output/demo-stage-{stage}",
}
_FROM_STAGE_1 = {"pretrain_mm_mlp_adapter": ("1", "mm_projector.bin")}
_FROM_STAGE_2 = {"pretrain_audio_mlp_adapter": ("2", "audio_adpter.bin")}
# "config.json" of a stage's output folder: the folder itself is its full export (--model_name_or_path).
_EXPORT = "config.json"


def _from_export(stage: str) -> dict:
    return {"model_name_or_path": (stage, _EXPORT)}

BUILTIN_PRESETS = (
    StagePreset("1", "pretrain_mlp", "pretrain_mlp_qwen.sh", "the vision projector",
                {**_VITA_COMMON, **_AUDIO_FROZEN, "learning_rate": 5e-4, "tune_mm_mlp_adapter": True},
                {**_DEMO_COMMON, "learning_rate": 3e-3, "max_steps": 600},
                SyntheticSelection(("image",), "eval_image")),
    StagePreset("2", "pretrain_audio_mlp", "pretrain_audio_mlp_qwen.sh", "the audio adapter",
                {**_VITA_COMMON, "learning_rate": 5e-4, "save_steps": 200, "tune_mm_mlp_adapter": False,
                 "tune_audio_mlp_adapter": True, "freeze_audio_encoder": True, "freeze_audio_encoder_adapter": False},
                {**_DEMO_COMMON, "learning_rate": 3e-3, "max_steps": 400},
                SyntheticSelection(("audio",), "eval_audio")),
    StagePreset("3", "finetune", "finetune_qwen.sh", "the LLM, the projector and the vision tower",
                {**_VITA_COMMON, **_AUDIO_FROZEN, "learning_rate": 2e-5, "unfreeze_vision_tower": True,
                 "mm_projector_lr": 2e-6},
                {**_DEMO_COMMON, "learning_rate": 1e-4, "mm_projector_lr": 1e-4, "max_steps": 200},
                SyntheticSelection(("image", "video", "text"), "eval_image"), {**_FROM_STAGE_1, **_FROM_STAGE_2},
                loads="stage 1's mm_projector.bin (--pretrain_mm_mlp_adapter)"),
    StagePreset("4", "finetune_task", "finetuneTask_qwen.sh", "the LLM and the projector",
                {**_VITA_COMMON, **_AUDIO_FROZEN, "learning_rate": 2e-5, "model_max_length": 33300,
                 "per_device_train_batch_size": 1},
                {**_DEMO_COMMON, "learning_rate": 1e-4, "per_device_train_batch_size": 8, "max_steps": 200},
                SyntheticSelection(("image", "video", "audio", "text"), "eval_image"), _from_export("3"),
                loads="stage 3's full export (--model_name_or_path)"),
    StagePreset("neg", "finetune_task_neg", "finetuneTaskNeg_qwen.sh",
                "the LLM, the projector and the audio adapter",
                {**_VITA_COMMON, "learning_rate": 2e-5, "freeze_audio_encoder": True,
                 "freeze_audio_encoder_adapter": False},
                {**_DEMO_COMMON, "learning_rate": 1e-4, "max_steps": 200},
                SyntheticSelection(("neg", "image", "audio"), "eval_image"), _from_export("4"),
                loads="stage 4's full export (--model_name_or_path)"),
    StagePreset("fo", "audio_prompt", "finetuneTaskNeg_qwen_fo.sh", "the audio prompt embeddings",
                {**_VITA_COMMON, **_AUDIO_FROZEN, "model_type": "qwen2p5_fo_instruct", "learning_rate": 1e-4,
                 "audio_prompt_finetune": True, "audio_prompt_num": 25, "audio_state_predictor_tuning": False},
                {**_DEMO_COMMON, "learning_rate": 3e-3, "max_steps": 200},
                SyntheticSelection(("audio",), "eval_audio"), _from_export("neg"),
                loads="the neg stage's full export (--model_name_or_path)"),
)


# "No preset": the flags alone decide, as VITA's own scripts do (the default with a real LLM).
NO_PRESET = StagePreset("none", "none", "your flags", "what the flags say (VITA's flag rules, no preset)", {})


def _index(presets) -> dict[str, StagePreset]:
    table = {}
    for preset in presets:
        table[preset.key] = preset
        table[preset.name] = preset
    return table


def load_stage_file(path: str) -> list[StagePreset]:
    """Read user stages from YAML.

    Format (a top-level ``stages:`` key is optional)::

        my_stage:
          base: "3"                    # optional: start from a preset's defaults
          trains: what it trains, in words
          defaults:                    # any config fields; the freeze policy follows the flags
            learning_rate: 1.0e-5
            unfreeze_vision_tower: false
            frozen_regex: "vision_tower\\\\.encoder\\\\.layers\\\\.0\\\\."

    Raises:
        FileNotFoundError / ValueError: naming the file and the stage.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"--stage_file {path!r}: no such file")
    with open(path) as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"--stage_file {path}: not valid YAML: {err}") from None
    raw = raw.get("stages", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise ValueError(f"--stage_file {path}: expected a mapping of stage name -> definition")
    builtins = _index(BUILTIN_PRESETS)
    presets = []
    for key, spec in raw.items():
        spec = spec or {}
        unknown = set(spec) - {"base", "trains", "defaults", "demo_defaults"}
        if unknown:
            raise ValueError(f"--stage_file {path}: stage {key!r} has unknown keys {sorted(unknown)}; "
                             "allowed: base, trains, defaults, demo_defaults")
        base = builtins.get(str(spec["base"])) if "base" in spec else None
        if "base" in spec and base is None:
            raise ValueError(f"--stage_file {path}: stage {key!r} has base {spec['base']!r}, not a built-in stage")
        fields = {"key": str(key), "name": str(key), "script": path, "loads": "",
                  "trains": spec.get("trains", base.trains if base else "as its flags say"),
                  "defaults": {**(base.defaults if base else {}), **(spec.get("defaults") or {})},
                  "demo_defaults": {**(base.demo_defaults if base else _DEMO_COMMON),
                                    **(spec.get("demo_defaults") or {})}}
        if base:
            fields.update(demo_data=base.demo_data, inputs=base.inputs)
        presets.append(StagePreset(**fields))
    return presets


def get_preset(stage: str, stage_file: str | None = None) -> StagePreset:
    """Look a stage up by key or alias, among the built-ins and ``stage_file``'s stages.

    Raises:
        ValueError: unknown stage, listing the known ones.
    """
    presets = [*BUILTIN_PRESETS, NO_PRESET] + (load_stage_file(stage_file) if stage_file else [])
    table = _index(presets)
    if stage not in table:
        known = ", ".join(p.key if p.key == p.name else f"{p.key}/{p.name}" for p in presets)
        raise ValueError(f"--stage {stage!r} is not a known stage; known: {known}")
    return table[stage]


def uses_embedded_default(config: RunConfig) -> bool:
    """True when no model, tower, encoder or training data is given: the demo model, data and settings.

    With the user's data but no model paths, this is False (the stage's VITA settings apply) while
    the missing model parts still come from the tiny default model.
    """
    m, d = config.model, config.data
    return not (m.model_name_or_path or m.vision_tower or m.audio_encoder or d.dataset_use or d.data_path)


def resolve_stage(config: RunConfig, embedded_default: bool, demo_output: Optional[str] = None
                  ) -> tuple[StagePreset, RunConfig]:
    """The stage ``config.stage`` names, and a copy of ``config`` with the preset's values where the user gave none.

    Without ``--stage``: stage 1 for a run without ``--model_name_or_path`` (the embedded default's
    demo), and no preset (:data:`NO_PRESET`) for a run with its own LLM, so VITA's flags alone mean
    what they mean in VITA.

    Args:
        config: the parsed run config (left unchanged).
        embedded_default: the run uses the embedded default model and data (demo settings apply).
        demo_output: output folder pattern of the demo stages (``{stage}`` is the stage key);
            earlier stages' artifacts are picked up from it. Default ``output/demo-stage-{stage}``.

    Returns:
        ``(preset, resolved config)``; the resolved config's ``stage`` is the preset's key.

    Raises:
        ValueError: unknown stage or a preset field that is not a config field.
    """
    stage = config.stage or (NO_PRESET.key if config.model.model_name_or_path else "1")
    preset = get_preset(stage, config.stage_file)
    resolved = copy.deepcopy(config)
    resolved.stage = preset.key
    values = dict(preset.defaults)
    sources = {name: f"stage {preset.key} preset ({os.path.basename(preset.script)})" for name in values}
    if embedded_default:
        pattern = demo_output or _DEMO_COMMON["output_dir"]
        for name, value in {**preset.demo_defaults, "output_dir": pattern}.items():
            values[name] = value.format(stage=preset.key) if isinstance(value, str) else value
            sources[name] = "embedded-default demo setting"
        for flag, (earlier, file_name) in preset.inputs.items():
            path = os.path.join(pattern.format(stage=earlier), file_name)
            if os.path.exists(path):
                values[flag] = os.path.dirname(path) if file_name == _EXPORT else path
                sources[flag] = f"stage {earlier} demo output"
    for name, value in values.items():
        if not resolved.is_explicit(name):
            resolved.set(name, value, sources[name])
    return preset, resolved


def describe_sources(config: RunConfig) -> str:
    """Lines saying which values came from flags / YAML / the preset / demo settings."""
    by_source: dict[str, list[str]] = {}
    for name, source in sorted(config.field_sources.items()):
        by_source.setdefault(source, []).append(f"{name}={config.get(name)!r}")
    return "\n".join(f"{source}: {', '.join(values)}" for source, values in sorted(by_source.items()))


def stage_notes(config: RunConfig, preset: StagePreset) -> list[str]:
    """Reminders about what the stage expects from an earlier one and did not get."""
    notes = []
    for flag, (earlier, file_name) in preset.inputs.items():
        if not config.get(flag) and flag.startswith("pretrain_"):
            notes.append(f"stage {preset.key} usually starts from stage {earlier}'s {file_name} "
                         f"(--{flag}); none given, so that module starts from its initial weights")
    if preset.loads and not config.get("model_name_or_path") and "--model_name_or_path" in preset.loads:
        notes.append(f"stage {preset.key} usually starts from {preset.loads}")
    return notes


def preset_summary() -> str:
    """One line per built-in stage: key, alias, what it trains, the VITA script."""
    return "\n".join(f"{p.key:>4} / {p.name:<19} trains {p.trains} ({p.script})" for p in BUILTIN_PRESETS)


__all__ = ["BUILTIN_PRESETS", "NO_PRESET", "StagePreset", "describe_sources", "get_preset", "load_stage_file",
           "preset_summary", "resolve_stage", "stage_notes", "uses_embedded_default"]
