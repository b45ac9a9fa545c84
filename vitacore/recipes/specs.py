"""Typed component configs, derived once from the flat VITA-compatible :class:`~vitacore.config.RunConfig`.

The run config stays the user-facing parser (flags, YAML, provenance); every component receives only
its own config from here: the model a :class:`ModelSpec`, the data a :class:`DataSpec`, the engine a
:class:`LoopConfig` and an :class:`OptimConfig`, the checkpointer a :class:`CheckpointConfig`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch

from vitacore.checkpoint import CheckpointConfig
from vitacore.config import RunConfig
from vitacore.data import BundledFiles, DataSpec
from vitacore.data.media_limits import MediaLimits
from vitacore.demo import DefaultAssets, SyntheticSelection
from vitacore.engine import LoopConfig, OptimConfig
from vitacore.model import LoraSpec, ModelSpec, QuantSpec


@dataclass(frozen=True)
class RunSpecs:
    """Every component's config for one stage run.

    Attributes:
        model / data / loop / optim / checkpoint: each component's own config.
        deepspeed: the ``--deepspeed`` JSON file (None: the built-in config).
        bf16 / fp16: the precision flags (the DeepSpeed config is completed from them).
    """

    model: ModelSpec
    data: DataSpec
    loop: LoopConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    deepspeed: Optional[str]
    bf16: bool
    fp16: bool


def compute_dtype(config: RunConfig) -> torch.dtype:
    """The dtype the precision flags ask for."""
    t = config.training
    return torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32


def model_spec(config: RunConfig, assets: Optional[DefaultAssets], from_export: bool) -> ModelSpec:
    """The model's config. Without ``--model_name_or_path``, parts without a path come from the embedded
    default's ``assets``; with a real LLM (or a VITA-layout folder, ``from_export``), a part without a
    path is absent: a real run never trains on a stand-in part."""
    m, t = config.model, config.training
    llm, tower, audio = m.model_name_or_path, m.vision_tower, m.audio_encoder
    if not llm:
        llm, tower, audio = assets.llm, tower or assets.vision_tower, audio or assets.audio_encoder
    lora = None
    if t.lora_enable:
        lora = LoraSpec(t.lora_r, t.lora_alpha, t.lora_dropout, t.lora_bias, t.lora_target_modules)
    return ModelSpec(
        llm_path=llm, vision_tower_path=tower, audio_encoder_path=audio, mm_projector_type=m.mm_projector_type,
        model_type=m.model_type, audio_prompt_finetune=m.audio_prompt_finetune, audio_prompt_num=m.audio_prompt_num,
        dtype=compute_dtype(config), model_max_length=t.model_max_length, seed=t.seed,
        loss_chunk_size=t.loss_chunk_size,
        image_aspect_ratio=config.data.image_aspect_ratio, lora=lora,
        quant=QuantSpec(t.bits, t.quant_type, t.double_quant), gradient_checkpointing=t.gradient_checkpointing,
        tf32=t.tf32, trust_remote_code=m.trust_remote_code)


def data_spec(config: RunConfig, assets: Optional[DefaultAssets], demo_data: SyntheticSelection) -> DataSpec:
    """The data's config; with no data flags, the embedded synthetic subsets ``demo_data`` of ``assets``."""
    d, t = config.data, config.training
    bundled = None
    if assets is not None:
        bundled = BundledFiles(tuple(assets.subset(name) for name in demo_data.train), assets.subset(demo_data.eval),
                               assets.data_root)
    return DataSpec(
        version=config.model.version, system_prompts=d.system_prompts, data_path=d.data_path,
        dataset_use=d.dataset_use, data_registry=d.data_registry, image_folder=d.image_folder,
        audio_folder=d.audio_folder, video_folder=d.video_folder, eval_data_path=d.eval_data_path, bundled=bundled,
        image_aspect_ratio=d.image_aspect_ratio, min_dynamic_patch=d.min_dynamic_patch,
        max_dynamic_patch=d.max_dynamic_patch, use_thumbnail=d.use_thumbnail, on_bad_sample=d.on_bad_sample,
        max_bad_sample_ratio=d.max_bad_sample_ratio, min_samples_for_bad_ratio=d.min_samples_for_bad_ratio,
        restrict_media_paths=d.restrict_media_paths, model_max_length=t.model_max_length, seed=t.seed,
        media_limits=MediaLimits.from_args(d), length_cache_dir=d.length_cache_dir, output_dir=t.output_dir)


def loop_config(config: RunConfig) -> LoopConfig:
    """The engine's loop settings (batches, length, logging, evaluation, checkpoint cadence)."""
    t = config.training
    return LoopConfig(
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps, logging_steps=t.logging_steps, eval_strategy=t.eval_strategy, eval_steps=t.eval_steps,
        eval_generate=config.get("eval_generate"),
        save_strategy=t.save_strategy, save_steps=t.save_steps, seed=t.seed,
        skip_nonfinite_steps=t.skip_nonfinite_steps,
        max_bad_sample_ratio=config.data.max_bad_sample_ratio,
        min_samples_for_bad_ratio=config.data.min_samples_for_bad_ratio,
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_persistent_workers=t.dataloader_persistent_workers,
        dataloader_prefetch_factor=t.dataloader_prefetch_factor, group_by_modality_length=t.group_by_modality_length,
        packing=t.packing, packing_max_length=t.packing_max_length or t.model_max_length,
        zero3_frozen_parts=t.zero3_frozen_parts,
        report_to=t.report_to, run_name=config.get("run_name"),
        progress_label="train" if config.stage == "none" else f"stage {config.stage}",
        plot_loss=t.plot_loss)


def optim_config(config: RunConfig) -> OptimConfig:
    """The optimizer, clipping, schedule and per-unit learning rates."""
    t = config.training
    return OptimConfig(
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon, max_grad_norm=t.max_grad_norm, lr_scheduler_type=t.lr_scheduler_type,
        lr_scheduler_kwargs=json.loads(t.lr_scheduler_kwargs) if t.lr_scheduler_kwargs else None,
        warmup_ratio=t.warmup_ratio, warmup_steps=t.warmup_steps, mm_projector_lr=t.mm_projector_lr,
        vision_tower_lr=t.vision_tower_lr, unit_lr=t.unit_lr, optim=t.optim)


def derive_specs(config: RunConfig, assets: Optional[DefaultAssets], demo_data: SyntheticSelection,
                 from_export: bool) -> RunSpecs:
    """Every component's config from a resolved, validated run config.

    Args:
        config: the run config after its stage preset and model-type inference.
        assets: the embedded default (None when the user's model paths and data cover everything).
        demo_data: the synthetic subsets the stage uses when the user gives no data.
        from_export: ``--model_name_or_path`` is a folder in VITA's layout (it holds every part).
    """
    t = config.training
    return RunSpecs(
        model=model_spec(config, assets, from_export), data=data_spec(config, assets, demo_data),
        loop=loop_config(config), optim=optim_config(config),
        checkpoint=CheckpointConfig(t.output_dir, t.save_total_limit, t.resume_from_checkpoint,
                                    t.allow_resume_changes),
        deepspeed=t.deepspeed, bf16=t.bf16, fp16=t.fp16)
