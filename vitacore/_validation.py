"""Value rules for the run config: ranges, choices and combinations, each error naming the flag."""

import json
import math
import re
from typing import List, Sequence

from vitacore import _flags
from vitacore.constants import ZERO3_FROZEN_PART_MODES
from vitacore.engine.config import OPTIMIZERS
from vitacore.engine.schedule import SCHEDULES
from vitacore.freeze import UNITS, parse_unit_lr

_STRATEGIES = ("epoch", "no", "steps")
_REPORTERS = ("all", "none", "tensorboard", "wandb")
_PROJECTOR = re.compile(r"^mlp([1-9]\d*)x_gelu$")


def rule_errors(cfg) -> List[str]:
    """Every range / choice / combination problem of ``cfg``, each naming the flag."""
    m, d, t = cfg.model, cfg.data, cfg.training
    errors: List[str] = []
    check = _flags.rule(errors)

    def at_least(name: str, low: int) -> None:
        value = cfg.get(name)
        check(value >= low, f"--{name} {value} must be >= {low}")

    def unit(name: str) -> None:
        value = cfg.get(name)
        check(0 <= value < 1, f"--{name} {value} must be in [0, 1)")

    def one_of(name: str, allowed: Sequence[str]) -> None:
        value = cfg.get(name)
        check(value in allowed, f"--{name} {value!r} is not one of: {', '.join(allowed)}")

    for name, value in cfg.flat_dict().items():
        # nan passes no comparison and inf passes "> 0": refuse both before any range rule reads them.
        check(not isinstance(value, float) or math.isfinite(value),
              f"--{name} {value} must be a finite number")
    check(not (t.bf16 and t.fp16), "--bf16 True and --fp16 True both set; choose one precision")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "logging_steps", "lora_r"):
        at_least(name, 1)
    for name in ("warmup_steps", "dataloader_num_workers", "skip_nonfinite_steps", "loss_chunk_size"):
        at_least(name, 0)
    at_least("model_max_length", 16)
    if t.packing_max_length is not None:
        # A pack must hold any one sample the model keeps (it truncates each to --model_max_length).
        check(t.packing_max_length >= t.model_max_length,
              f"--packing_max_length {t.packing_max_length} is below --model_max_length {t.model_max_length}: a "
              "sample the model keeps whole would not fit in a pack; raise --packing_max_length to at least "
              "--model_max_length (or leave it unset to use --model_max_length)")
        check(t.packing, f"--packing_max_length {t.packing_max_length} has no effect without --packing True; "
                         "add it or drop the flag")
    check(t.dataloader_prefetch_factor is None or t.dataloader_prefetch_factor >= 1,
          f"--dataloader_prefetch_factor {t.dataloader_prefetch_factor} must be >= 1")
    check(t.learning_rate > 0, f"--learning_rate {t.learning_rate} must be > 0")
    check(t.adam_epsilon > 0, f"--adam_epsilon {t.adam_epsilon} must be > 0 (it keeps AdamW's division finite)")
    check(t.num_train_epochs > 0, f"--num_train_epochs {t.num_train_epochs} must be > 0")
    check(t.max_steps == -1 or t.max_steps > 0,
          f"--max_steps {t.max_steps} must be > 0, or -1 to train for --num_train_epochs")
    check(t.weight_decay >= 0, f"--weight_decay {t.weight_decay} must be >= 0")
    check(t.max_grad_norm >= 0, f"--max_grad_norm {t.max_grad_norm} must be >= 0 (0: no clipping)")
    check(t.ddp_timeout >= 1, f"--ddp_timeout {t.ddp_timeout} must be >= 1 (seconds a collective may wait)")
    for name in ("warmup_ratio", "adam_beta1", "adam_beta2", "lora_dropout"):
        unit(name)
    one_of("lr_scheduler_type", SCHEDULES)
    if t.lr_scheduler_kwargs is not None:
        try:
            kwargs = json.loads(t.lr_scheduler_kwargs)
        except json.JSONDecodeError as err:
            kwargs = err
        check(isinstance(kwargs, dict), f"--lr_scheduler_kwargs {t.lr_scheduler_kwargs!r} is not a JSON object "
                                        "(write it as '{\"num_cycles\": 2}')")
    one_of("save_strategy", _STRATEGIES)
    one_of("eval_strategy", _STRATEGIES)
    one_of("quant_type", ("fp4", "nf4"))
    one_of("lora_bias", ("all", "lora_only", "none"))
    one_of("zero3_frozen_parts", ZERO3_FROZEN_PART_MODES)
    check(t.optim in OPTIMIZERS,
          f"--optim {t.optim!r} is not supported; vitacore implements adamw_torch (torch.optim.AdamW) and "
          "adamw_torch_fused (torch.optim.AdamW with fused=True)")
    check(t.bits in (4, 8, 16), f"--bits {t.bits} is not one of: 4, 8, 16")
    # Quantized weights cannot take optimizer steps: they train only through LoRA adapters.
    check(t.bits not in (4, 8) or t.lora_enable,
          f"--bits {t.bits} loads the LLM quantized, and quantized weights cannot train; "
          "add --lora_enable True (QLoRA) or use --bits 16")
    check(t.lora_bias == "none" or t.lora_enable,
          f"--lora_bias {t.lora_bias!r} has no effect without --lora_enable True; add it or drop the flag")
    for name in ("lora_target_modules", "lora_weight_path"):
        check(not cfg.get(name) or t.lora_enable,
              f"--{name} {cfg.get(name)!r} has no effect without --lora_enable True; add it or drop the flag")
    if t.save_strategy == "steps":
        check(t.save_steps >= 1, f"--save_steps {t.save_steps} must be >= 1 with "
                                 "--save_strategy steps (or use --save_strategy no/epoch)")
    for name in ("eval_steps", "save_total_limit"):
        value = cfg.get(name)
        check(value is None or value >= 1, f"--{name} {value} must be >= 1 (or None)")
    # Two ways to name the training data; mixing them would leave one silently unused.
    given = [f"--{n}" for n in ("dataset_use", "data_registry") if cfg.get(n)]
    check(not (d.data_path and given),
          f"--data_path conflicts with {' and '.join(given)}: give either --data_path (JSON files) or "
          "--data_registry with --dataset_use (named datasets), not both")
    one_of("on_bad_sample", ("error", "skip"))
    check(0 <= d.max_bad_sample_ratio <= 1,
          f"--max_bad_sample_ratio {d.max_bad_sample_ratio} must be in [0, 1]")
    at_least("min_samples_for_bad_ratio", 0)
    # Media limits bound memory per sample; 0 or less would refuse every record that has the medium.
    for name in ("max_image_pixels", "max_images_per_record", "max_tiles_per_record", "max_video_frames_decoded",
                 "max_animation_frames", "max_audio_sample_rate"):
        at_least(name, 1)
    check(d.max_audio_seconds > 0, f"--max_audio_seconds {d.max_audio_seconds} must be > 0")
    check(d.image_aspect_ratio in (None, "square", "pad", "dynamic"),
          f"--image_aspect_ratio {d.image_aspect_ratio!r} is not one of: square, pad, dynamic, None")
    check(1 <= d.min_dynamic_patch <= d.max_dynamic_patch,
          f"--min_dynamic_patch {d.min_dynamic_patch} and --max_dynamic_patch {d.max_dynamic_patch}: "
          "need 1 <= min <= max")
    projector = m.mm_projector_type
    check(projector in ("linear", "identity") or bool(_PROJECTOR.match(projector)),
          f"--mm_projector_type {projector!r} is not one of: linear, identity, "
          "mlp2x_gelu (or mlpNx_gelu with N >= 1)")
    reporters = [r.strip() for r in t.report_to.split(",")]
    check(all(r in _REPORTERS for r in reporters),
          f"--report_to {t.report_to!r} is not one of: {', '.join(_REPORTERS)} "
          "(or a comma-separated list of them)")
    if m.audio_prompt_finetune:
        check(m.audio_prompt_num is not None and m.audio_prompt_num >= 1,
              f"--audio_prompt_finetune True needs --audio_prompt_num >= 1 "
              f"(got {m.audio_prompt_num})")
    check(not m.use_s2, "--use_s2 True: S2 multi-scale vision features are not implemented in vitacore; "
                        "drop the flag (or pass --use_s2 False)")
    for name, what in (("mm_use_im_start_end", "image start / end tokens around each image"),
                       ("mm_use_im_patch_token", "an image patch token in the vocabulary")):
        check(not cfg.get(name), f"--{name} True: LLaVA's {what}; VITA's data and models have none, so vitacore "
                                 "supports only False (drop the flag)")
    check(d.is_multimodal, "--is_multimodal False: VITA's text-only mode (no placeholder or state-token rules) is not "
                           "supported; records without media train as text already, so drop the flag")
    check(not (m.tune_mm_mlp_adapter and t.freeze_mm_mlp_adapter),
          "--tune_mm_mlp_adapter True contradicts --freeze_mm_mlp_adapter True; set one to False")
    check(cfg.stage is None or cfg.stage.strip() != "", "--stage must be a non-empty stage name, e.g. --stage 1")
    for name in ("mm_projector_lr", "vision_tower_lr"):
        value = cfg.get(name)
        check(value is None or value > 0, f"--{name} {value} must be > 0 (or None)")
    if t.unit_lr:
        try:
            parse_unit_lr(t.unit_lr, UNITS)
        except ValueError as err:
            errors.append(str(err))
    for name in ("trainable_regex", "frozen_regex"):
        pattern = cfg.get(name)
        if pattern:
            try:
                re.compile(pattern)
            except re.error as err:
                errors.append(f"--{name} {pattern!r} is not a valid regular expression: {err}")
    return errors


# Flags VITA's and LLaVA's scripts pass that change nothing here, with the reason the run prints.
_WITHOUT_EFFECT = {
    "lazy_preprocess": "samples are always built lazily, one at a time (VITA's dataset is lazy whatever it says)",
    "remove_unused_columns": "an HF Trainer setting; the model takes exactly the batch's fields",
    "mpt_attn_impl": "MPT models are not supported",
    "cache_dir": "models load from their folders or the default Hugging Face cache (set HF_HOME to move it)",
}


def ignored_flag_notes(cfg) -> List[str]:
    """One note per flag the user set that the run accepts without effect, saying why."""
    notes = [f"--{name} has no effect: {why}" for name, why in _WITHOUT_EFFECT.items() if cfg.is_explicit(name)]
    if cfg.training.bits == 16:
        notes += [f"--{name} has no effect without --bits 4 (it configures 4-bit loading)"
                  for name in ("double_quant", "quant_type") if cfg.is_explicit(name)]
    return notes
