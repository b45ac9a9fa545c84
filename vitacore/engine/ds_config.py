"""DeepSpeed configuration: a built-in default, or a user's JSON with ``"auto"`` values filled.

The filling rules are the HF Trainer's, so a VITA ``zero3.json`` behaves as it does under VITA's
scripts; an explicit value that contradicts a flag is an error naming both.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional

from vitacore.engine.config import LoopConfig, OptimConfig


def builtin_config(world_size: int) -> dict:
    """ZeRO-0 for one process, ZeRO-2 for several."""
    stage = 0 if world_size == 1 else 2
    return {"zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def load_user_config(path: str) -> dict:
    """Read a DeepSpeed JSON file.

    Raises:
        FileNotFoundError / ValueError: naming ``--deepspeed`` and the file.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"--deepspeed {path!r}: no such file")
    with open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"--deepspeed {path}: malformed JSON at line {err.lineno}: {err.msg}") from None


def _fill(section: dict, key: str, value: Any, flag: str, source: str) -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise ValueError(
            f"{source}: {key}={current!r} contradicts {flag} (which gives {value!r}); "
            f"set it to \"auto\" or change the flag"
        )


def complete_config(raw: dict, *, loop: LoopConfig, optim: OptimConfig, bf16: bool, fp16: bool, world_size: int,
                    hidden_size: int, total_steps: int, warmup_steps: int, source: str = "built-in config") -> dict:
    """Fill ``"auto"`` values from the run's settings and check explicit ones against them.

    Args:
        raw: the user's (or built-in) config; not modified.
        loop: batch sizes and accumulation.
        optim: learning rate, AdamW settings and clipping.
        bf16 / fp16: the precision flags.
        world_size: number of processes.
        hidden_size: the LLM hidden size (sizes ZeRO buckets).
        total_steps / warmup_steps: optimizer steps, for a config-defined scheduler.
        source: name used in error messages (``--deepspeed PATH``).
    """
    cfg = copy.deepcopy(raw)
    micro, accum = loop.per_device_train_batch_size, loop.gradient_accumulation_steps
    _fill(cfg, "train_micro_batch_size_per_gpu", micro, "--per_device_train_batch_size", source)
    _fill(cfg, "gradient_accumulation_steps", accum, "--gradient_accumulation_steps", source)
    _fill(cfg, "train_batch_size", world_size * micro * accum,
          "world size x --per_device_train_batch_size x --gradient_accumulation_steps", source)
    _fill(cfg, "gradient_clipping", optim.max_grad_norm, "--max_grad_norm", source)
    for key, flag, enabled in (("bf16", "--bf16", bf16), ("fp16", "--fp16", fp16)):
        section = cfg.setdefault(key, {})
        _fill(section, "enabled", bool(enabled), flag, source)
    optimizer = cfg.get("optimizer")
    if optimizer:
        params = optimizer.setdefault("params", {})
        _fill(params, "lr", optim.learning_rate, "--learning_rate", source)
        _fill(params, "betas", [optim.adam_beta1, optim.adam_beta2], "--adam_beta1/--adam_beta2", source)
        _fill(params, "eps", optim.adam_epsilon, "--adam_epsilon", source)
        _fill(params, "weight_decay", optim.weight_decay, "--weight_decay", source)
    scheduler = cfg.get("scheduler")
    if scheduler:
        params = scheduler.setdefault("params", {})
        for key, value in (("warmup_min_lr", 0), ("warmup_max_lr", optim.learning_rate),
                           ("warmup_num_steps", max(1, warmup_steps)), ("total_num_steps", total_steps)):
            if params.get(key) == "auto":
                params[key] = value
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if zero.get(key) == "auto":
            zero[key] = value
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def resolve_deepspeed_config(path: Optional[str], *, loop: LoopConfig, optim: OptimConfig, world_size: int,
                             hidden_size: int, bf16: bool = False, fp16: bool = False) -> tuple[dict, list[str]]:
    """The run's complete DeepSpeed config (the ``--deepspeed`` file at ``path``, or built-in) and notes for the log.

    A ``scheduler`` block is dropped: DeepSpeed's warmup schedulers give every param group one LR,
    which would erase per-unit learning rates; vitacore's ``--lr_scheduler_type`` schedule runs instead.

    Args:
        path: a DeepSpeed JSON file (None: ZeRO-0 for one process, ZeRO-2 for several).
        loop / optim: what ``"auto"`` values are filled from.
        world_size: number of processes.
        hidden_size: the LLM hidden size (sizes ZeRO buckets).
        bf16 / fp16: the precision flags.
    """
    if path:
        raw, source = load_user_config(path), f"--deepspeed {path}"
    else:
        raw, source = builtin_config(world_size), "built-in DeepSpeed config"
    notes = []
    if "scheduler" in raw:
        raw = {k: v for k, v in raw.items() if k != "scheduler"}
        notes.append(f"{source}: its scheduler block is ignored so per-unit learning rates survive; "
                     f"--lr_scheduler_type {optim.lr_scheduler_type} is used")
    config = complete_config(raw, loop=loop, optim=optim, bf16=bf16, fp16=fp16, world_size=world_size,
                             hidden_size=hidden_size, total_steps=0, warmup_steps=0, source=source)
    return config, notes


def zero_stage(config: dict) -> int:
    """The ZeRO stage a config asks for (0 when absent)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))
