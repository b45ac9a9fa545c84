"""The engine's own configs: how the loop runs (:class:`LoopConfig`) and how it optimizes (:class:`OptimConfig`).

Plain dataclasses with the HF Trainer's field names, so a run derives them from its flags one to
one (``vitacore.recipes``) and a script writes them by hand. Values are checked where they enter:
:meth:`__post_init__` raises ``ValueError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vitacore.constants import ZERO3_FROZEN_PART_MODES
from vitacore.engine.schedule import SCHEDULES

_STRATEGIES = ("no", "steps", "epoch")
# The HF Trainer's --optim names vitacore implements: torch.optim.AdamW, default or fused kernel.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class LoopConfig:
    """Batches, length of the run, logging, evaluation and checkpoint cadence.

    Attributes:
        per_device_train_batch_size / per_device_eval_batch_size: micro-batch per process.
        gradient_accumulation_steps: micro-batches per optimizer step.
        num_train_epochs: passes over the data (when ``max_steps`` is -1).
        max_steps: optimizer steps of the run (-1: from ``num_train_epochs``).
        logging_steps: a metrics row every N optimizer steps.
        eval_strategy / eval_steps: ``no``, ``steps`` (every ``eval_steps``, default ``logging_steps``) or ``epoch``.
        eval_generate: each evaluation also generates every eval sample's answer (greedy) and scores it
            (:func:`vitacore.engine.evaluation.evaluate_generation`; the Trainer's ``eval_generation``: the prompts).
        save_strategy / save_steps: ``no``, ``steps`` (every ``save_steps``) or ``epoch``.
        seed: data order and loader seeds.
        skip_nonfinite_steps: micro-batches with a NaN / inf loss, and optimizer steps with a NaN / inf
            gradient norm, skipped before the run stops.
        max_bad_sample_ratio: stop once more than this share of the samples seen were bad.
        min_samples_for_bad_ratio: samples (over all ranks) seen before ``max_bad_sample_ratio`` applies.
        dataloader_num_workers / dataloader_persistent_workers / dataloader_prefetch_factor: the loader.
        group_by_modality_length: VITA's modality- and length-grouped sampler.
        packing: several samples per training row (:mod:`vitacore.data.packing`); evaluation stays unpacked.
        packing_max_length: the most tokens of a packed row, media expanded (resolved: ``--model_max_length``
            when the flag is unset); required with ``packing``.
        zero3_frozen_parts: under ZeRO-3, ``whole`` keeps frozen encoders and adapters whole on every rank,
            outside DeepSpeed's partitioning; ``partitioned`` leaves them to it (:mod:`vitacore.model.zero3_view`).
        report_to: ``none``, ``tensorboard``, ``wandb``, ``all`` or a comma list (:mod:`vitacore.engine.trackers`).
        run_name: the run's name in wandb (None: the output folder's base name).
        progress_label: the progress bar's label (``"stage 1"``).
        plot_loss: draw ``training_curves.png`` from ``metrics.jsonl`` (main rank) after each checkpoint
            and at the end of the run (:func:`vitacore.engine.plots.draw_training_curves`).
    """

    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    logging_steps: int = 10
    eval_strategy: str = "no"
    eval_steps: Optional[int] = None
    eval_generate: bool = False
    save_strategy: str = "steps"
    save_steps: int = 500
    seed: int = 42
    skip_nonfinite_steps: int = 0
    max_bad_sample_ratio: float = 0.01
    min_samples_for_bad_ratio: int = 200
    dataloader_num_workers: int = 0
    dataloader_persistent_workers: bool = False
    dataloader_prefetch_factor: Optional[int] = None
    group_by_modality_length: bool = False
    packing: bool = False
    packing_max_length: Optional[int] = None
    zero3_frozen_parts: str = "whole"
    report_to: str = "none"
    run_name: Optional[str] = None
    progress_label: str = "train"
    plot_loss: bool = True

    def __post_init__(self):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            _check(getattr(self, name) >= 1, f"{name} {getattr(self, name)} must be >= 1")
        _check(self.max_steps == -1 or self.max_steps > 0, f"max_steps {self.max_steps} must be > 0, or -1")
        _check(self.num_train_epochs > 0, f"num_train_epochs {self.num_train_epochs} must be > 0")
        for name in ("eval_strategy", "save_strategy"):
            _check(getattr(self, name) in _STRATEGIES,
                   f"{name} {getattr(self, name)!r} is not one of: {', '.join(_STRATEGIES)}")
        _check(self.save_strategy != "steps" or self.save_steps >= 1, f"save_steps {self.save_steps} must be >= 1")
        _check(not self.packing or (self.packing_max_length or 0) >= 1,
               f"packing needs packing_max_length >= 1 (the most tokens of a packed row, usually the model's "
               f"model_max_length); got {self.packing_max_length}")
        _check(self.zero3_frozen_parts in ZERO3_FROZEN_PART_MODES,
               f"zero3_frozen_parts {self.zero3_frozen_parts!r} is not one of: {', '.join(ZERO3_FROZEN_PART_MODES)}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, gradient clipping, the LR schedule, and the learning rate of each freeze unit.

    Attributes:
        learning_rate: the peak LR of every unit without its own.
        weight_decay / adam_beta1 / adam_beta2 / adam_epsilon: AdamW's.
        max_grad_norm: clip the global gradient norm (0: no clipping).
        lr_scheduler_type: a name of transformers' ``get_scheduler`` (:data:`vitacore.engine.schedule.SCHEDULES`).
        lr_scheduler_kwargs: the schedule's extra arguments (``num_cycles``, ``power``, ``min_lr_rate``, ...).
        warmup_ratio / warmup_steps: warm-up length (``warmup_steps`` wins when > 0).
        mm_projector_lr / vision_tower_lr / unit_lr: per-unit LRs (see :mod:`vitacore.freeze.param_groups`).
        optim: the HF Trainer's ``--optim``: ``adamw_torch`` (``torch.optim.AdamW``) or ``adamw_torch_fused``
            (the same with ``fused=True``); a DeepSpeed config's ``optimizer`` block takes precedence.
    """

    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: Optional[dict] = None
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    mm_projector_lr: Optional[float] = None
    vision_tower_lr: Optional[float] = None
    unit_lr: Optional[str] = None
    optim: str = "adamw_torch"

    def __post_init__(self):
        _check(self.learning_rate > 0, f"learning_rate {self.learning_rate} must be > 0")
        _check(self.optim in OPTIMIZERS,
               f"--optim {self.optim!r} is not supported; vitacore implements adamw_torch (torch.optim.AdamW) and "
               f"adamw_torch_fused (torch.optim.AdamW with fused=True)")
        _check(self.lr_scheduler_type in SCHEDULES,
               f"lr_scheduler_type {self.lr_scheduler_type!r} is not one of: {', '.join(SCHEDULES)}")
        _check(self.max_grad_norm >= 0, f"max_grad_norm {self.max_grad_norm} must be >= 0 (0: no clipping)")
        _check(self.warmup_steps >= 0, f"warmup_steps {self.warmup_steps} must be >= 0")
