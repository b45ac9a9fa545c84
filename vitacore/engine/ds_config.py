"""DeepSpeed configuration: a built-in default, or a user's JSON with ``"auto"`` values filled.

The filling rules are the HF Trainer's (``HfTrainerDeepSpeedConfig.trainer_config_process`` /
``trainer_config_finalize``, with accelerate's ``DeepSpeedPlugin.set_mixed_precision`` for the precision
sections), so a VITA ``zero3.json`` behaves as it does under VITA's scripts: a key whose value is
``"auto"`` is filled from the flags, a key the file leaves out stays out, and an explicit value that
contradicts a flag is an error naming both. Two deliberate differences (see :func:`complete_config`):
missing batch keys are filled, and a missing ``gradient_clipping`` is written as 0 (VITA's ``zero3.json``
has none, and its runs did not clip; today's DeepSpeed would clip at 1.0 by default).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional

from vitacore.engine.config import LoopConfig, OptimConfig


def builtin_config(world_size: int) -> dict:
    """ZeRO-0 for one process, ZeRO-2 for several; clipping at ``--max_grad_norm`` (the HF Trainer clips there
    without DeepSpeed; 0: no clipping)."""
    stage = 0 if world_size == 1 else 2
    return {"zero_optimization": {"stage": stage}, "gradient_clipping": "auto", "steps_per_print": 10**9,
            "wall_clock_breakdown": False}


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


class _Filler:
    """HF's ``fill_match`` over one config: ``"auto"`` becomes the flag's value; contradictions are collected."""

    def __init__(self, cfg: dict, source: str):
        self.cfg, self.source, self.mismatches = cfg, source, []

    def _node(self, dotted: str) -> tuple[Optional[dict], str]:
        *parents, key = dotted.split(".")
        node = self.cfg
        for name in parents:
            node = node.get(name)
            if not isinstance(node, dict):
                return None, key
        return node, key

    def fill(self, dotted: str, value: Any, flag: str, must_match: bool = True, fill_missing: bool = False) -> None:
        """``"auto"`` -> ``value``; a missing key stays missing unless ``fill_missing``; an explicit value other
        than ``value`` is a mismatch when ``must_match``."""
        node, key = self._node(dotted)
        if node is None:
            return
        current = node.get(key)
        if current == "auto" or (current is None and fill_missing):
            node[key] = value
        elif must_match and current is not None and current != value:
            self.mismatches.append(f"{dotted}={current!r} contradicts {flag} (which gives {value!r})")

    def raise_mismatches(self) -> None:
        if self.mismatches:
            raise ValueError(f"{self.source}: {'; '.join(self.mismatches)}; set these to \"auto\" or change the flags")


def complete_config(raw: dict, *, loop: LoopConfig, optim: OptimConfig, bf16: bool, fp16: bool, world_size: int,
                    hidden_size: int, total_steps: int, warmup_steps: int, source: str = "built-in config") -> dict:
    """Fill ``"auto"`` values from the run's settings and check explicit ones against them, as the HF Trainer does.

    Args:
        raw: the user's (or built-in) config; not modified.
        loop: batch sizes and accumulation.
        optim: learning rate, AdamW settings and clipping.
        bf16 / fp16: the precision flags.
        world_size: number of processes.
        hidden_size: the LLM hidden size (sizes ZeRO buckets).
        total_steps / warmup_steps: optimizer steps, for a config-defined scheduler.
        source: name used in error messages (``--deepspeed PATH``).

    Raises:
        ValueError: explicit values that contradict the flags, each named with its flag.
    """
    cfg = copy.deepcopy(raw)
    fill = _Filler(cfg, source)
    micro, accum = loop.per_device_train_batch_size, loop.gradient_accumulation_steps
    # Batch keys are filled even when MISSING (the HF Trainer leaves them out, and accelerate then sets a
    # missing gradient_accumulation_steps to 1): vitacore owns the accumulation boundary, and its loop must
    # agree with DeepSpeed's, which divides each micro-batch's gradient by gradient_accumulation_steps.
    fill.fill("train_micro_batch_size_per_gpu", micro, "--per_device_train_batch_size", fill_missing=True)
    fill.fill("gradient_accumulation_steps", accum, "--gradient_accumulation_steps", fill_missing=True)
    fill.fill("train_batch_size", world_size * micro * accum,
              "world size x --per_device_train_batch_size x --gradient_accumulation_steps", fill_missing=True)
    fill.fill("gradient_clipping", optim.max_grad_norm, "--max_grad_norm")
    # Missing (VITA's zero3.json): the HF Trainer leaves it to DeepSpeed's default, which was 0 (no clipping)
    # when VITA trained; recent DeepSpeed (0.19.8 seen) defaults to 1.0 (deepspeedai/DeepSpeed#8068). An
    # explicit 0 keeps VITA's behaviour whatever the installed DeepSpeed; --max_grad_norm does not apply.
    cfg.setdefault("gradient_clipping", 0.0)
    fill.fill("optimizer.params.lr", optim.learning_rate, "--learning_rate")
    fill.fill("optimizer.params.betas", [optim.adam_beta1, optim.adam_beta2], "--adam_beta1/--adam_beta2")
    fill.fill("optimizer.params.eps", optim.adam_epsilon, "--adam_epsilon")
    fill.fill("optimizer.params.weight_decay", optim.weight_decay, "--weight_decay")
    fill.fill("scheduler.params.warmup_min_lr", 0, "", must_match=False)
    fill.fill("scheduler.params.warmup_max_lr", optim.learning_rate, "--learning_rate")
    fill.fill("scheduler.params.total_num_steps", total_steps, "the run's optimizer steps")
    fill.fill("scheduler.params.warmup_num_steps", max(1, warmup_steps), "--warmup_steps / --warmup_ratio")
    fill.fill("fp16.enabled", bool(fp16), "--fp16")
    fill.fill("bf16.enabled", bool(bf16), "--bf16")
    # accelerate's set_mixed_precision: a missing section of the chosen precision is created enabled, any
    # other missing one disabled.
    if fp16 and "fp16" not in cfg:
        cfg["fp16"] = {"enabled": True, "auto_cast": True}
    if bf16 and "bf16" not in cfg:
        cfg["bf16"] = {"enabled": True}
    for key in ("fp16", "bf16"):
        cfg.setdefault(key, {"enabled": False})
    cfg.setdefault("zero_optimization", {"stage": 0})
    fill.fill("zero_optimization.reduce_bucket_size", hidden_size * hidden_size, "", must_match=False)
    if zero_stage(cfg) == 3:  # as HF: below ZeRO-3 an "auto" stays, and DeepSpeed's config model drops it
        fill.fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size), "",
                  must_match=False)
        fill.fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size, "", must_match=False)
    fill.raise_mismatches()
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def resolve_deepspeed_config(path: Optional[str], *, loop: LoopConfig, optim: OptimConfig, world_size: int,
                             hidden_size: int, bf16: bool = False, fp16: bool = False) -> tuple[dict, list[str]]:
    """The run's complete DeepSpeed config (the ``--deepspeed`` file at ``path``, or built-in) and notes for the log.

    A ``scheduler`` block is dropped: DeepSpeed's warmup schedulers give every param group one LR,
    which would erase per-unit learning rates; vitacore's ``--lr_scheduler_type`` schedule runs instead.
    A file without ``gradient_clipping`` does not clip (see :func:`complete_config`); a note says so.

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
    if path and "gradient_clipping" not in raw:
        notes.append(f"{source} has no gradient_clipping: gradients are not clipped (as under the HF Trainer when "
                     f"VITA trained); add \"gradient_clipping\": \"auto\" to clip at --max_grad_norm "
                     f"({optim.max_grad_norm})")
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
