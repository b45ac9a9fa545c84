"""One measured training run of bench/gpu_mfu.py: config, model, Trainer, timing, and the release afterwards.

:func:`run_variant` builds a fresh model and ``vitacore.Trainer`` for one :class:`Variant`, trains
``warmup + steps`` optimizer steps and returns a :class:`Measurement` of the timed ones: step time,
the positions, supervised targets and FLOPs of exactly the micro-batches those steps ran (from their
``sample_ids``), and peak GPU memory. Afterwards the engine is destroyed and its memory handed back,
so the next variant starts from an empty GPU. A CUDA out-of-memory error ends the variant, reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from mfu_data import Workload
from mfu_flops import Shapes, sample_flops
from mfu_models import Sizes, build_random, shapes_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO3 = os.path.join(REPO, "configs", "zero3.json")


@dataclass(frozen=True)
class Variant:
    """One training run to measure.

    Attributes:
        name: label in the output.
        model_max_length: the model's (and, packed, the row's) longest sequence, media expanded.
        micro_batch: rows per micro-batch (samples when padded, packs when packed).
        loss_chunk_size: the chunked loss's chunk (0: full logits).
        workload: ``make_workload(model, shapes)`` -> the run's :class:`~mfu_data.Workload`.
        warmup / steps: untimed, then timed optimizer steps.
    """

    name: str
    model_max_length: int
    micro_batch: int
    loss_chunk_size: int
    workload: Callable
    warmup: int
    steps: int


@dataclass
class Measurement:
    """The timed steps of one variant (totals over them), or ``oom`` when it ran out of GPU memory."""

    name: str
    oom: Optional[str] = None
    step_s: float = 0.0
    median_s: float = 0.0
    steps: int = 0
    samples: int = 0
    positions: int = 0  # real LLM positions (media expanded)
    computed: int = 0  # positions the LLM ran on: rows x the longest row, padding included
    supervised: int = 0
    flops: int = 0  # with the activation-checkpointing recomputation
    model_flops: int = 0  # without it (MFU)
    peak_bytes: Optional[int] = None  # whole run, model states included
    before_bytes: Optional[int] = None  # allocated when the timed steps began
    step_peak_bytes: Optional[int] = None  # peak over the timed steps
    final_loss: Optional[float] = None
    chunked: bool = False  # the chunked loss ran (the output head allows it and loss_chunk_size > 0)
    info: dict = field(default_factory=dict)  # what the single-run report prints about the model and config

    def per_s(self, count: int) -> float:
        return count / (self.step_s * self.steps)


class StepClock:
    """Clock stamps (after a CUDA synchronize) whenever DeepSpeed finishes an optimizer update.

    At the end of warm-up step ``warmup`` it notes the memory allocated and resets CUDA's peak, so the
    timed steps' peak is read alone. Installed once per process; :meth:`start` arms it per variant.
    """

    def __init__(self, cuda: bool):
        from deepspeed.runtime.engine import DeepSpeedEngine

        self.cuda, self.stamps, self.warmup = cuda, [], 0
        self.warmup_peak: Optional[int] = None
        self.before: Optional[int] = None
        original = DeepSpeedEngine._take_model_step
        clock = self

        def stamped(engine, *args, **kwargs):
            result = original(engine, *args, **kwargs)
            if clock.cuda:
                torch.cuda.synchronize()
            clock.stamps.append(time.perf_counter())
            if clock.cuda and len(clock.stamps) == clock.warmup:
                clock.warmup_peak = torch.cuda.max_memory_allocated()
                clock.before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            return result

        DeepSpeedEngine._take_model_step = stamped

    def start(self, warmup: int) -> None:
        self.stamps, self.warmup, self.warmup_peak, self.before = [], warmup, None, None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()


def make_config(args, variant: Variant):
    """Stage 3's preset (LLM + projector + tower train, audio frozen) with this variant's sizes."""
    import vitacore

    config = vitacore.RunConfig()
    config.stage = "3"
    if args.model_name_or_path:
        config.set("model_name_or_path", args.model_name_or_path, "flag")
        config.set("vision_tower", args.vision_tower, "flag")
        if args.audio_encoder:
            config.set("audio_encoder", args.audio_encoder, "flag")
    # VITA's stage-3 values (not the embedded demo's), even for the random models; a resolved copy.
    _, config = vitacore.resolve_stage(config, embedded_default=False)
    t = config.training
    t.output_dir = tempfile.mkdtemp(prefix="vitacore-gpu-mfu-")
    t.deepspeed = args.deepspeed
    t.bf16 = not args.cpu_smoke
    t.per_device_train_batch_size = variant.micro_batch
    t.gradient_accumulation_steps = args.accumulation
    t.max_steps = variant.warmup + variant.steps
    t.model_max_length = variant.model_max_length
    t.loss_chunk_size = variant.loss_chunk_size
    t.gradient_checkpointing = not args.no_gradient_checkpointing
    t.logging_steps = 10**9
    t.save_strategy = "no"
    t.eval_strategy = "no"
    t.report_to = "none"
    vitacore.validate(config)
    return config


def _count(measurement: Measurement, rows: list[tuple[int, ...]], workload: Workload, base: Shapes,
           checkpointing: bool) -> None:
    """Add one micro-batch's rows to ``measurement``: positions, padding, targets and per-sample FLOPs."""
    row_positions = [sum(workload.stats[i].positions for i in row) for row in rows]
    measurement.computed += len(rows) * max(row_positions)
    for row in rows:
        for index in row:
            stats = workload.stats[index]
            measurement.samples += 1
            measurement.positions += stats.positions
            measurement.supervised += stats.supervised
            shapes = dataclasses.replace(base, text_tokens=stats.text_tokens, images_per_sample=stats.images,
                                         head_tokens=stats.supervised if measurement.chunked else None)
            with_recompute, model_only = sample_flops(shapes, checkpointing)
            measurement.flops += with_recompute
            measurement.model_flops += model_only


def _forget_module(model) -> None:
    """Drop what DeepSpeed keeps of ``model`` process-wide once its engine is destroyed.

    ZeRO-3 keeps a module-level stack of the modules in forward: engine construction pushes the model
    and never pops it, and with activation checkpointing each step leaves submodules on it (their
    recomputed forward stops before its post-forward hooks run). Its parameter coordinator also caches,
    per (coordinator, module), the parameters to release in an unbounded ``functools.lru_cache`` on
    the class. Each keeps every variant's model (and its GPU memory) reachable until the process ends.
    Called between variants only, when no engine is alive.
    """
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if stack is not None:
        owned = {id(module) for module in model.modules()}
        stack[:] = [module for module in stack if id(module) not in owned]
    coordinator = getattr(partitioned_param_coordinator, "PartitionedParameterCoordinator", None)
    for attribute in vars(coordinator).values() if coordinator is not None else ():
        _clear_caches(attribute)


def _clear_caches(function) -> None:
    """Clear every ``functools`` cache among ``function``'s wrappers (``__wrapped__`` and closure cells)."""
    pending, seen = [function], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen or not callable(current):
            continue
        seen.add(id(current))
        if hasattr(current, "cache_clear"):
            current.cache_clear()
        pending.append(getattr(current, "__wrapped__", None))
        for cell in getattr(current, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                pending.append(cell.cell_contents)


def _release(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_variant(args, variant: Variant, dist, clock: StepClock, sizes: Sizes, say) -> Measurement:
    """Build, train and time one variant; the GPU memory it took is released before returning."""
    measurement = Measurement(variant.name)
    config = make_config(args, variant)
    started = time.time()
    try:
        # Everything that holds the model (parameter groups, hooks, the engine) lives in _train's frame.
        _train(args, variant, config, dist, clock, sizes, say, measurement)
    finally:
        _release(clock.cuda)
        shutil.rmtree(config.training.output_dir, ignore_errors=True)
        if clock.cuda:
            measurement.info["left_allocated"] = torch.cuda.memory_allocated()
    say(f"[{variant.name}] done in {time.time() - started:.0f}s", flush=True)
    return measurement


def _train(args, variant: Variant, config, dist, clock: StepClock, sizes: Sizes, say,
           measurement: Measurement) -> None:
    import vitacore
    from vitacore.model.loss import chunked_head
    from vitacore.recipes import build_model_from_config, plan_model
    from vitacore.recipes.specs import loop_config, optim_config

    if args.model_name_or_path:
        plan = plan_model(config, with_data=False)  # the LLM's size and family from its config, no weights
        config, hidden = plan.config, plan.hidden_size
    else:
        hidden = sizes.llm["hidden_size"]
    t = config.training
    loop, optim = loop_config(config), optim_config(config)  # the Trainer's typed configs, as a stage run's
    ds_config, _ = vitacore.resolve_deepspeed_config(t.deepspeed, loop=loop, optim=optim, world_size=dist.world_size,
                                                     hidden_size=hidden, bf16=t.bf16, fp16=t.fp16)
    say(f"[{variant.name}] building the model ...", flush=True)
    build_started = time.time()
    if args.model_name_or_path:
        model = build_model_from_config(config, deepspeed_config=ds_config)[0].model
    else:
        model = build_random(config, sizes, ds_config)
    build_seconds = time.time() - build_started
    # What a stage run switches on: activation checkpointing on the LLM, TF32, dummy encoder passes
    # with several processes, and (on GPUs) the FLOP count of the metrics rows.
    vitacore.prepare_for_training(model, t.gradient_checkpointing, t.tf32, dist.world_size, dist.device)
    base = shapes_of(model, 0)
    measurement.chunked = model.loss_chunk_size > 0 and chunked_head(model.llm) is not None
    policy = vitacore.policy_from_config(config)
    policy.apply(model, vitacore.UNIT_PREFIXES)
    groups = vitacore.param_groups_for_run(model, vitacore.UNIT_PREFIXES, optim)
    workload = variant.workload(model, base)

    def numel(p):
        return getattr(p, "ds_numel", p.numel())

    measurement.info.update(
        build_seconds=build_seconds, shapes=base, ds_config=ds_config, config=config,
        partitioned=all(hasattr(p, "ds_id") for p in model.llm.parameters()),
        units={name: sum(numel(p) for p in m.parameters()) for name, m in model.unit_modules().items()},
        trained_units=policy.trained_units(), trainable=sum(numel(p) for g in groups for p in g["params"]),
        attention=model.llm.config._attn_implementation)
    batches: list[list[str]] = []  # each forward's sample ids, in order (read on the host: no device sync)
    hook = model.register_forward_pre_hook(lambda _m, _a, kwargs: batches.append(list(kwargs["sample_ids"])),
                                           with_kwargs=True)
    checkpointer = vitacore.Checkpointer(
        vitacore.CheckpointConfig(t.output_dir, t.save_total_limit, t.resume_from_checkpoint), dist)
    trainer = vitacore.Trainer(model, groups, workload.dataset, workload.collate, dist, loop=loop, optim=optim,
                               deepspeed_config=ds_config, checkpointer=checkpointer)
    clock.start(variant.warmup)
    try:
        result = trainer.fit()
    except torch.cuda.OutOfMemoryError as error:
        measurement.oom = str(error).split("\n")[0][:160]
        say(f"[{variant.name}] CUDA out of memory: {measurement.oom}", flush=True)
        return
    finally:
        hook.remove()
        trainer.engine.destroy()
        _forget_module(model)
    total = variant.warmup + variant.steps
    if len(clock.stamps) < total:
        raise SystemExit(f"[{variant.name}] expected {total} optimizer steps, saw {len(clock.stamps)}")
    timed = clock.stamps[variant.warmup - 1:total]
    measurement.steps = variant.steps
    measurement.step_s = (timed[-1] - timed[0]) / variant.steps
    measurement.median_s = statistics.median(b - a for a, b in zip(timed, timed[1:]))
    measurement.final_loss = result.last_loss
    measurement.info["rows"] = result.rows
    timed_batches = batches[variant.warmup * args.accumulation:total * args.accumulation]
    for ids in timed_batches:
        _count(measurement, workload.rows_of(ids), workload, base, t.gradient_checkpointing)
    measurement.info["timed_ids"] = frozenset(i for ids in timed_batches for i in ids)  # this rank's
    if dist.world_size > 1:  # every rank counted its own micro-batches: the totals are over all GPUs
        names = ("samples", "positions", "computed", "supervised", "flops", "model_flops")
        totals = torch.tensor([float(getattr(measurement, n)) for n in names], dtype=torch.float64,
                              device=dist.device)
        torch.distributed.all_reduce(totals)
        for name, value in zip(names, totals.tolist()):
            setattr(measurement, name, int(value))
    if clock.cuda:
        measurement.step_peak_bytes = torch.cuda.max_memory_allocated()
        measurement.before_bytes = clock.before
        measurement.peak_bytes = max(clock.warmup_peak or 0, measurement.step_peak_bytes)
