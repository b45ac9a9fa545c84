"""The training loop: DeepSpeed initialized here, forward / backward / step owned here."""

from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from vitacore.checkpoint.resumable import (
    clean_partial_saves, load_checkpoint, resolve_resume, save_checkpoint,
)
from vitacore.constants import IGNORE_INDEX
from vitacore.data.bad_samples import BadSampleLog
from vitacore.engine.distributed import DistInfo
from vitacore.engine.ds_config import resolve_deepspeed_config
from vitacore.engine.loader import build_train_loader
from vitacore.engine.metrics import MetricsLog, MetricsWindow, TensorBoardLog, answer_accuracy, batch_size, format_lr
from vitacore.engine.schedule import lr_multiplier, warmup_steps_for
from vitacore.engine.signals import StopRequest


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """What a finished run reports."""

    num_steps: int
    seconds: float
    first_loss: Optional[float]
    last_loss: Optional[float]
    final_eval: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    stopped_by: Optional[str] = None
    num_skipped_steps: int = 0


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Trainer:
    """Runs one stage: builds the DeepSpeed engine and loops over the data.

    Args:
        config: the run's ``RunConfig``.
        model: the model; its forward takes a collated batch and returns ``loss`` and ``logits``.
        param_groups: optimizer groups (each with ``params``, ``lr``, ``weight_decay``, ``name``).
        train_dataset / eval_dataset: datasets of samples; ``collate_fn`` batches them.
        dist: the process's place in the job.
        on_log: called with every metrics row (for printing).
        deepspeed_config: the complete DeepSpeed config the model was built for (ZeRO-3 builds need
            it before the model exists); resolved from ``--deepspeed`` here when None.
        save_artifacts: writes the stage artifacts into a folder (called on every rank with each
            checkpoint's folder; see :func:`vitacore.checkpoint.save_run_artifacts`).
    """

    def __init__(self, config, model: torch.nn.Module, param_groups: list[dict], train_dataset: Dataset,
                 collate_fn: Callable, dist: DistInfo, eval_dataset: Optional[Dataset] = None,
                 on_log: Optional[Callable[[dict], None]] = None, deepspeed_config: Optional[dict] = None,
                 save_artifacts: Optional[Callable[[str], dict]] = None):
        self.config = config
        self.args = config.training
        self.model = model
        self.param_groups = param_groups
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.collate_fn = collate_fn
        self.dist = dist
        self.on_log = on_log or (lambda row: None)
        self.save_artifacts = save_artifacts
        # Decided before anything is written, so a refused resume leaves the folder untouched.
        self.resume_path = resolve_resume(self.args.resume_from_checkpoint, self.args.output_dir)
        os.makedirs(self.args.output_dir, exist_ok=True)
        self.metrics = MetricsLog(self.args.output_dir, enabled=dist.is_main)
        self.bad_samples = BadSampleLog(config.data.max_bad_sample_ratio, dist.is_main)
        self._check_precision()
        self.notes = self._apply_runtime_flags()
        if deepspeed_config is None:
            hidden = getattr(getattr(model, "config", None), "hidden_size", 1024)
            deepspeed_config, ds_notes = resolve_deepspeed_config(self.args, dist.world_size, hidden)
            self.notes += ds_notes
        self.ds_config = deepspeed_config
        self._accepts_num_items = "num_items_in_batch" in inspect.signature(model.forward).parameters
        self._token_model = hasattr(model, "llm")
        if hasattr(model, "run_all_encoders"):
            # Several ranks: every encoder runs every step (on a dummy input if need be), so no rank
            # waits in a collective for a module another rank skipped. One process has no one to wait.
            model.run_all_encoders = dist.world_size > 1
        self.tensorboard = TensorBoardLog.create(self.args, dist.is_main, self.notes)
        if hasattr(model, "count_flops") and dist.device.type == "cuda":
            model.count_flops = True  # adds tflops_per_s and mfu to the metrics rows

        self.sampler, self.loader, self.loader_generator = build_train_loader(train_dataset, collate_fn, self.args,
                                                                              dist)
        self.num_micro_per_epoch = math.ceil(self.sampler.num_samples_per_epoch / self.args.per_device_train_batch_size)
        updates_per_epoch = max(1, math.ceil(self.num_micro_per_epoch / self.args.gradient_accumulation_steps))
        if self.args.max_steps > 0:
            self.total_steps = self.args.max_steps
        else:
            self.total_steps = max(1, math.ceil(self.args.num_train_epochs * updates_per_epoch))
        self.warmup_steps = warmup_steps_for(self.total_steps, self.args.warmup_steps, self.args.warmup_ratio)
        self.engine = self._initialize()
        self.identity = self._identity()

    def _check_precision(self) -> None:
        if self.dist.device.type == "cpu" and self.args.fp16:
            raise ValueError("--fp16 True is not supported on CPU (DeepSpeed refuses fp16 there); "
                             "use --bf16 True or drop the flag for fp32")

    def _apply_runtime_flags(self) -> list[str]:
        """Gradient checkpointing and TF32; returns notes about flags ignored on this hardware."""
        notes = []
        if self.args.gradient_checkpointing:
            llm = getattr(self.model, "llm", self.model)
            # Non-reentrant: works with frozen weights and inputs that carry the only gradient path.
            kwargs = {"use_reentrant": False}
            if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if self.args.tf32:
            if self.dist.device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            else:
                notes.append("--tf32 True ignored: TF32 exists only on NVIDIA GPUs")
        return notes

    def _initialize(self):
        import deepspeed

        multiplier = lr_multiplier(self.args.lr_scheduler_type, self.warmup_steps, self.total_steps)
        kwargs = {"model": self.model.to(self.dist.device), "config": self.ds_config, "dist_init_required": False}
        if "optimizer" in self.ds_config:
            kwargs["model_parameters"] = self.param_groups
        else:
            kwargs["optimizer"] = torch.optim.AdamW(
                self.param_groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon, weight_decay=self.args.weight_decay)
        # A callable, so DeepSpeed hands it the (possibly wrapped) optimizer; per-group LRs survive.
        kwargs["lr_scheduler"] = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        engine, _, _, _ = deepspeed.initialize(**kwargs)
        if self.dist.world_size == 1 and engine.zero_optimization_stage() == 0:
            # One process, no ZeRO: the gradient all-reduce has no peer; skip flattening for it.
            engine.enable_backward_allreduce = False
        return engine

    def _identity(self) -> dict:
        """What a checkpoint must share with this run to be resumed by it."""
        mm = getattr(self.model, "mm_config", {}) or {}
        trainable = {name: list(getattr(p, "ds_shape", p.shape))
                     for name, p in self.model.named_parameters() if p.requires_grad}
        return {"world_size": self.dist.world_size, "llm": getattr(self.model.config, "_name_or_path", None)
                if hasattr(self.model, "config") else None,
                "vision_tower": mm.get("mm_vision_tower"), "audio_encoder": mm.get("mm_audio_encoder"),
                "mm_projector_type": mm.get("mm_projector_type"), "trainable": trainable,
                # The data position is counted in these units: a different layout would land elsewhere.
                "batch": [self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps],
                "seed": self.args.seed}

    def _group_lrs(self) -> dict[str, float]:
        groups = self.engine.optimizer.param_groups
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(groups)}

    def _grad_norm_before_step(self) -> Optional[float]:
        if self.engine.zero_optimization_stage() > 0:
            return None
        grads = [p.grad.detach() for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _micro_batches(self, start_epoch: int = 0, start_micro: int = 0):
        """Yield ``(epoch, index in epoch, closes a group, batch, loss divisor)`` until the run ends.

        Micro-batches are read one accumulation group ahead. An epoch whose micro-batch count is not
        a multiple of ``--gradient_accumulation_steps`` ends with a short group, which still makes an
        optimizer step (as the HF Trainer does). The divisor makes every supervised token of the
        group weigh the same across micro-batches and ranks (see :meth:`_loss_divisor`). A resumed
        run starts at ``start_micro`` of ``start_epoch`` (a group boundary) by skipping indices.
        """
        accumulation = self.args.gradient_accumulation_steps
        epoch, first = start_epoch, start_micro
        while True:
            self.sampler.set_epoch(epoch)
            self.sampler.skip(first * self.args.per_device_train_batch_size)
            self.loader_generator.manual_seed(self.args.seed + epoch)
            group, start = [], first
            batches = iter(self.loader)
            for index in range(first, self.num_micro_per_epoch):
                group.append(next(batches))
                if len(group) == accumulation or index + 1 == self.num_micro_per_epoch:
                    divisor = self._loss_divisor(group)
                    for offset, batch in enumerate(group):
                        yield epoch, start + offset, offset + 1 == len(group), batch, divisor
                    start, group = index + 1, []
            epoch, first = epoch + 1, 0

    def _loss_divisor(self, group: list[dict]) -> Optional[torch.Tensor]:
        """Supervised tokens of the group over all ranks / (ranks x accumulation steps).

        DeepSpeed averages gradients over ranks and divides each micro-batch's by the accumulation
        steps; dividing a token *sum* by this makes the step's gradient the mean over every token of
        the global batch, so 1 process x 8 samples and 2 processes x 4 give the same update.
        """
        if not self._accepts_num_items:
            return None
        if any("labels" not in b for b in group):
            return None
        count = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group)
        total = torch.tensor([float(count)], device=self.dist.device)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(total)
        scale = self.dist.world_size * self.args.gradient_accumulation_steps
        return (total / scale).clamp(min=1.0 / scale).squeeze(0)

    def fit(self) -> TrainResult:
        """Train to ``total_steps`` optimizer steps, evaluating as configured; return a summary.

        SIGTERM / SIGINT finish the current optimizer step, then the run returns with
        ``stopped_by`` set (the caller saves). A non-finite loss raises :class:`NonFiniteLossError`
        naming the step, or skips that micro-batch while ``--skip_nonfinite_steps`` allows.
        """
        bar = tqdm(total=self.total_steps, desc=f"stage {self.config.stage}", disable=not self.dist.is_main,
                   dynamic_ncols=True)
        try:
            with StopRequest() as stop:
                return self._run(bar, stop)
        finally:
            bar.close()
            self.tensorboard.close()

    def _agree(self, loss: torch.Tensor, stop: StopRequest) -> tuple[bool, bool]:
        """(loss finite on every rank, a stop was requested on some rank), in one collective."""
        flags = [0.0 if bool(torch.isfinite(loss)) else 1.0, 1.0 if stop.signal_name else 0.0]
        if self.dist.world_size > 1:
            reduced = torch.tensor(flags, device=self.dist.device)
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
            flags = reduced.tolist()
            if flags[1] and stop.signal_name is None:
                stop.signal_name = "peer rank"
        return not flags[0], bool(flags[1])

    def _resume(self) -> dict:
        """Restore the newest complete checkpoint (or the one asked for); the loop position to start at."""
        if self.dist.is_main:
            clean_partial_saves(self.args.output_dir)
        if self.resume_path is None:
            self.metrics.reset()  # a fresh run starts a fresh log
            return {"step": 0, "epoch": 0, "micro_in_epoch": 0, "num_skipped_steps": 0, "window": None}
        state = load_checkpoint(self.engine, self.resume_path, self.identity, self.dist)
        position = state["position"]
        self.bad_samples.load_state_dict(position.get("bad_samples"))
        if position["micro_in_epoch"] >= self.num_micro_per_epoch:
            position.update(epoch=position["epoch"] + 1, micro_in_epoch=0)
        if self.dist.is_main:
            tqdm.write(f"note: resumed from {self.resume_path} at step {position['step']} of {self.total_steps} "
                       f"(epoch {position['epoch']}, micro-batch {position['micro_in_epoch']} of "
                       f"{self.num_micro_per_epoch}; no data replayed)")
        self._log({"step": position["step"], "event": "resumed", "path": self.resume_path})
        return position

    def _save_due(self, step: int, end_of_epoch: bool) -> bool:
        strategy = self.args.save_strategy
        return (strategy == "steps" and step % self.args.save_steps == 0) or (strategy == "epoch" and end_of_epoch)

    def save(self, step: int, epoch: int, micro_in_epoch: int, num_skipped: int, window: "MetricsWindow") -> str:
        """Write ``checkpoint-<step>`` (every rank calls this at an optimizer-step boundary)."""
        position = {"step": step, "epoch": epoch, "micro_in_epoch": micro_in_epoch,
                    "num_skipped_steps": num_skipped, "window": window.state_dict(),
                    "bad_samples": self.bad_samples.state_dict()}
        state = {"position": position, "identity": self.identity, "total_steps": self.total_steps}
        path = save_checkpoint(self.engine, self.args.output_dir, step, state, self.dist,
                               write_artifacts=self.save_artifacts, config=self.config,
                               save_total_limit=self.args.save_total_limit)
        self._log({"step": step, "event": "checkpoint", "path": path})
        return path

    def _run(self, bar, stop: StopRequest) -> TrainResult:
        args, engine = self.args, self.engine
        position = self._resume()
        step, skipped = position["step"], position["num_skipped_steps"]
        epoch, index, stopped_by = position["epoch"], position["micro_in_epoch"] - 1, None
        window = MetricsWindow()
        if position["window"]:
            window.load_state_dict(position["window"])
        bar.update(step)
        engine.train()
        started = time.time()
        if step >= self.total_steps:
            return self._finish(step, epoch, index, started, stopped_by, skipped)
        for epoch, index, closes, batch, divisor in self._micro_batches(position["epoch"], position["micro_in_epoch"]):
            # vitacore owns the accumulation boundary, so short groups at an epoch's end still step.
            engine.set_gradient_accumulation_boundary(closes)
            window.bad += self.bad_samples.observe(batch)  # takes the markers out of the batch
            batch = _to_device(batch, self.dist.device)
            if divisor is not None:
                batch["num_items_in_batch"] = divisor
            loss = engine(**batch)["loss"]
            finite, stop_requested = self._agree(loss, stop)
            if finite:
                engine.backward(loss)
                window.flops += getattr(self.model, "last_flops", 0.0)
                # Summed over the group's micro-batches and ranks, this is the group's token-mean loss.
                share = loss.item() / args.gradient_accumulation_steps if divisor is not None else loss.item()
                window.add(share, batch, share_of_step=divisor is not None)
            elif skipped < args.skip_nonfinite_steps:
                skipped += 1  # every rank skips this micro-batch's backward together
            else:
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at optimizer step {step + 1} (epoch {epoch}, micro-batch {index + 1}, "
                    f"samples {batch.get('sample_ids')}); lower --learning_rate, check the data, or allow "
                    f"skips with --skip_nonfinite_steps N")
            grad_norm = self._grad_norm_before_step() if closes else None
            engine.step()
            if not closes:
                continue
            step += 1
            bar.update(1)
            window.steps += 1
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            epoch_progress = self._epoch_progress(epoch, index + 1)
            end_of_epoch = index + 1 == self.num_micro_per_epoch
            if step % args.logging_steps == 0 or step == self.total_steps:
                row = window.row(step, epoch_progress, format_lr(self._group_lrs()), grad_norm, self.dist)
                self._log(row)
                # Totals over ranks, so every rank raises at the same step.
                self.bad_samples.add(row["bad_samples"], window.global_samples)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                window = MetricsWindow()
            if stop_requested:  # every rank saw the same flag in the same collective
                stopped_by = stop.signal_name
                self._log({"step": step, "epoch": epoch_progress, "event": "stopped", "signal": stopped_by})
            if stop_requested or step >= self.total_steps:
                if args.save_strategy != "no":
                    self.save(step, epoch, index + 1, skipped, window)
                break
            if self._should_eval(step, end_of_epoch):
                self.evaluate(step, epoch_progress)
            if self._save_due(step, end_of_epoch):
                self.save(step, epoch, index + 1, skipped, window)
        return self._finish(step, epoch, index, started, stopped_by, skipped)

    def _finish(self, step: int, epoch: int, index: int, started: float, stopped_by: Optional[str],
                skipped: int) -> TrainResult:
        final_eval = {}
        if self.eval_dataset is not None and stopped_by is None:
            final_eval = self.evaluate(step, self._epoch_progress(epoch, index + 1))
        train_rows = [r for r in self.metrics.rows if "loss" in r]
        return TrainResult(step, time.time() - started, train_rows[0]["loss"] if train_rows else None,
                           train_rows[-1]["loss"] if train_rows else None, final_eval, self.metrics.rows,
                           stopped_by, skipped)

    def _log(self, row: dict) -> None:
        self.metrics.write(row)
        self.tensorboard.write(row)
        self.on_log(row)

    def _epoch_progress(self, epoch: int, micro: int) -> float:
        return round(epoch + micro / max(1, self.num_micro_per_epoch), 4)

    def _should_eval(self, step: int, end_of_epoch: bool) -> bool:
        if self.eval_dataset is None or step >= self.total_steps:
            return False
        if self.args.eval_strategy == "epoch":
            return end_of_epoch
        if self.args.eval_strategy == "steps":
            return step % (self.args.eval_steps or self.args.logging_steps) == 0
        return False

    @torch.no_grad()
    def evaluate(self, step: int, epoch: float) -> dict:
        """Loss and teacher-forced answer accuracy on the eval set, summed over ranks."""
        sampler = DistributedSampler(self.eval_dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                     shuffle=False)
        loader = DataLoader(self.eval_dataset, batch_size=self.args.per_device_eval_batch_size, sampler=sampler,
                            collate_fn=self.collate_fn, num_workers=self.args.dataloader_num_workers,
                            generator=torch.Generator().manual_seed(self.args.seed))  # leaves the global RNG alone
        self.engine.eval()
        totals = torch.zeros(6, dtype=torch.float64)
        for batch in loader:
            batch.pop("bad_samples", None)  # eval replacements are not counted in the training ratio
            batch = _to_device(batch, self.dist.device)
            output = self.engine(**batch)
            if "merged_labels" in output and "logits" in output:
                correct, supervised, exact, rows = answer_accuracy(output["logits"], output["merged_labels"])
            else:  # not a token model: a loss weighted by rows, no accuracy
                rows = batch_size(batch)
                correct, supervised, exact = 0, rows, 0
            totals += torch.tensor([float(output["loss"]) * supervised, supervised, correct, exact, rows, 1.0],
                                   dtype=torch.float64)
        if self.dist.world_size > 1:
            totals = totals.to(self.dist.device)
            torch.distributed.all_reduce(totals)
            totals = totals.cpu()
        self.engine.train()
        loss_sum, supervised, correct, exact, rows, _ = totals.tolist()
        row = {"step": step, "epoch": epoch, "eval_loss": loss_sum / max(1.0, supervised), "eval_samples": int(rows)}
        if correct or exact or self._token_model:
            row.update(eval_accuracy=correct / max(1.0, supervised), eval_exact_match=exact / max(1.0, rows))
        self._log(row)
        return row
