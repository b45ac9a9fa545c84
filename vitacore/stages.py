"""Stage presets: config defaults from VITA's stage scripts plus a freeze policy.

A preset only fills values the user did not set (flags and ``--config`` YAML always win); every
value it sets is recorded in ``config.field_sources`` so the report can say where it came from.
When the embedded default is in use, a few values are tuned for the tiny model so the demo learns
in about a minute; those are recorded too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from vitacore.freeze import FreezePolicy


@dataclass(frozen=True)
class StagePreset:
    """A named stage.

    Attributes:
        key: canonical short name (``"1"``).
        name: descriptive alias (``"pretrain_mlp"``).
        script: the VITA script the defaults come from.
        defaults: config field -> value.
        policy: which units train.
        demo_defaults: values used instead with the embedded default model.
    """

    key: str
    name: str
    script: str
    defaults: Mapping[str, object]
    policy: FreezePolicy
    demo_defaults: Mapping[str, object] = field(default_factory=dict)


_VITA_COMMON = {
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.03,
    "weight_decay": 0.0,
    "num_train_epochs": 1.0,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 2,
    "model_max_length": 6200,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 1,
    "logging_steps": 1,
}

_DEMO_COMMON = {
    "gradient_accumulation_steps": 1,
    "model_max_length": 512,
    "logging_steps": 10,
    "per_device_eval_batch_size": 32,
    "output_dir": "output/demo-stage-{stage}",
}

PRESETS = {
    "1": StagePreset(
        key="1", name="pretrain_mlp", script="pretrain_mlp_qwen.sh",
        defaults={**_VITA_COMMON, "learning_rate": 5e-4, "tune_mm_mlp_adapter": True},
        policy=FreezePolicy({"mm_projector": "full"}),
        demo_defaults={**_DEMO_COMMON, "learning_rate": 3e-3, "max_steps": 600},
    ),
}
_ALIASES = {preset.name: key for key, preset in PRESETS.items()}


def get_preset(stage: str) -> StagePreset:
    """Look a stage up by key or alias.

    Raises:
        ValueError: unknown stage, listing the known ones.
    """
    key = _ALIASES.get(stage, stage)
    if key not in PRESETS:
        known = ", ".join(f"{k}/{p.name}" for k, p in PRESETS.items())
        raise ValueError(f"--stage {stage!r} is not a known stage; known: {known}")
    return PRESETS[key]


def apply_stage(config, embedded_default: bool) -> StagePreset:
    """Fill ``config`` from the stage preset where the user gave no value; return the preset."""
    preset = get_preset(config.stage)
    config.stage = preset.key
    values = dict(preset.defaults)
    sources = {name: f"stage {preset.key} preset ({preset.script})" for name in values}
    if embedded_default:
        for name, value in preset.demo_defaults.items():
            values[name] = value.format(stage=preset.key) if isinstance(value, str) else value
            sources[name] = "embedded-default demo setting"
    for name, value in values.items():
        if not config.is_explicit(name):
            config.set(name, value, sources[name])
    return preset


def describe_sources(config) -> str:
    """Lines saying which values came from flags / YAML / the preset / demo settings."""
    by_source: dict[str, list[str]] = {}
    for name, source in sorted(config.field_sources.items()):
        by_source.setdefault(source, []).append(f"{name}={config.get(name)!r}")
    return "\n".join(f"{source}: {', '.join(values)}" for source, values in sorted(by_source.items()))
