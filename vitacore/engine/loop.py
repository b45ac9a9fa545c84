"""The training loop: DeepSpeed initialized here, forward / backward / step owned here."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from vitacore.engine.distributed import DistInfo
from vitacore.engine.ds_config import builtin_config, complete_config, load_user_config
from vitacore.engine.metrics import MetricsLog, answer_accuracy, format_lr
from vitacore.engine.schedule import lr_multiplier, warmup_steps_for


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


class _Window:
    """Sums over the micro-batches since the last logged row."""

    def __init__(self):
        self.loss, self.micro, self.tokens, self.samples, self.started = 0.0, 0, 0, 0, time.time()

    def add(self, loss: float, batch: dict) -> None:
        self.loss += loss
        self.micro += 1
        self.tokens += int(batch["attention_mask"].sum())
        self.samples += batch["input_ids"].shape[0]

    def row(self, step: int, epoch: float, lr, grad_norm, world_size: int) -> dict:
        elapsed = max(1e-9, time.time() - self.started)
        return {"step": step, "epoch": epoch, "loss": self.loss / max(1, self.micro), "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": self.tokens * world_size / elapsed,
                "samples_per_s": self.samples * world_size / elapsed}


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
    """

    def __init__(self, config, model: torch.nn.Module, param_groups: list[dict], train_dataset: Dataset,
                 collate_fn: Callable, dist: DistInfo, eval_dataset: Optional[Dataset] = None,
                 on_log: Optional[Callable[[dict], None]] = None):
        self.config = config
        self.args = config.training
        self.model = model
        self.param_groups = param_groups
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.collate_fn = collate_fn
        self.dist = dist
        self.on_log = on_log or (lambda row: None)
        os.makedirs(self.args.output_dir, exist_ok=True)
        self.metrics = MetricsLog(self.args.output_dir, enabled=dist.is_main)
        self._check_precision()
        self.notes = self._apply_runtime_flags()

        self.sampler = DistributedSampler(train_dataset, num_replicas=dist.world_size, rank=dist.rank,
                                          shuffle=True, seed=self.args.seed, drop_last=False)
        self.loader = DataLoader(train_dataset, batch_size=self.args.per_device_train_batch_size,
                                 sampler=self.sampler, collate_fn=collate_fn,
                                 num_workers=self.args.dataloader_num_workers)
        updates_per_epoch = max(1, math.ceil(len(self.loader) / self.args.gradient_accumulation_steps))
        if self.args.max_steps > 0:
            self.total_steps = self.args.max_steps
        else:
            self.total_steps = max(1, math.ceil(self.args.num_train_epochs * updates_per_epoch))
        self.warmup_steps = warmup_steps_for(self.total_steps, self.args.warmup_steps, self.args.warmup_ratio)
        self.engine = self._initialize()

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

        hidden = getattr(self.model.config, "hidden_size", 1024)
        if self.args.deepspeed:
            raw, source = load_user_config(self.args.deepspeed), f"--deepspeed {self.args.deepspeed}"
        else:
            raw, source = builtin_config(self.dist.world_size), "built-in DeepSpeed config"
        self.ds_config = complete_config(raw, training=self.args, world_size=self.dist.world_size,
                                         hidden_size=hidden, total_steps=self.total_steps,
                                         warmup_steps=self.warmup_steps, source=source)
        multiplier = lr_multiplier(self.args.lr_scheduler_type, self.warmup_steps, self.total_steps)
        kwargs = {"model": self.model.to(self.dist.device), "config": self.ds_config, "dist_init_required": False}
        if "optimizer" in self.ds_config:
            kwargs["model_parameters"] = self.param_groups
        else:
            kwargs["optimizer"] = torch.optim.AdamW(
                self.param_groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon, weight_decay=self.args.weight_decay)
        kwargs["lr_scheduler"] = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        engine, _, _, _ = deepspeed.initialize(**kwargs)
        return engine

    def _group_lrs(self) -> dict[str, float]:
        groups = self.engine.optimizer.param_groups
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(groups)}

    def _grad_norm_before_step(self) -> Optional[float]:
        if self.engine.zero_optimization_stage() > 0:
            return None
        total = 0.0
        for param in self.engine.module.parameters():
            if param.grad is not None:
                total += float(param.grad.detach().float().pow(2).sum())
        return math.sqrt(total)

    def _micro_batches(self):
        """Yield ``(epoch, index in epoch, closes an accumulation group, batch)`` until the run ends.

        An epoch whose micro-batch count is not a multiple of ``--gradient_accumulation_steps``
        ends with a short group, which still makes an optimizer step (as the HF Trainer does), so
        every epoch sees each sample once and loop steps stay optimizer steps.
        """
        accumulation = self.args.gradient_accumulation_steps
        num_batches = len(self.loader)
        epoch = 0
        while True:
            self.sampler.set_epoch(epoch)
            for index, batch in enumerate(self.loader):
                closes = (index + 1) % accumulation == 0 or index + 1 == num_batches
                yield epoch, index, closes, batch
            epoch += 1

    def fit(self) -> TrainResult:
        """Train to ``total_steps`` optimizer steps, evaluating as configured; return a summary."""
        args, engine = self.args, self.engine
        engine.train()
        started = time.time()
        step, epoch, index = 0, 0, -1
        self._window = _Window()
        bar = tqdm(total=self.total_steps, desc=f"stage {self.config.stage}", disable=not self.dist.is_main,
                   dynamic_ncols=True)
        for epoch, index, closes, batch in self._micro_batches():
            # vitacore owns the accumulation boundary, so short groups at an epoch's end still step.
            engine.set_gradient_accumulation_boundary(closes)
            batch = _to_device(batch, self.dist.device)
            loss = engine(**batch)["loss"]
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at optimizer step {step + 1} (epoch {epoch}, micro-batch {index + 1}, "
                    f"samples {batch.get('sample_ids')}); lower --learning_rate or check the data")
            engine.backward(loss)
            self._window.add(loss.item(), batch)
            grad_norm = self._grad_norm_before_step() if closes else None
            engine.step()
            if not closes:
                continue
            step += 1
            bar.update(1)
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            epoch_progress = self._epoch_progress(epoch, index + 1)
            if step % args.logging_steps == 0 or step == self.total_steps:
                row = self._window.row(step, epoch_progress, format_lr(self._group_lrs()), grad_norm,
                                       self.dist.world_size)
                self.metrics.write(row)
                self.on_log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                self._window = _Window()
            if step >= self.total_steps:
                break
            end_of_epoch = index + 1 == len(self.loader)
            if self._should_eval(step, end_of_epoch):
                self.evaluate(step, epoch_progress)
        bar.close()
        final_eval = self.evaluate(step, self._epoch_progress(epoch, index + 1)) if self.eval_dataset is not None else {}
        train_rows = [r for r in self.metrics.rows if "loss" in r]
        first_loss = train_rows[0]["loss"] if train_rows else None
        last_loss = train_rows[-1]["loss"] if train_rows else None
        return TrainResult(step, time.time() - started, first_loss, last_loss, final_eval, self.metrics.rows)

    def _epoch_progress(self, epoch: int, micro: int) -> float:
        return round(epoch + micro / max(1, len(self.loader)), 4)

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
                            collate_fn=self.collate_fn, num_workers=self.args.dataloader_num_workers)
        self.engine.eval()
        totals = torch.zeros(6, dtype=torch.float64)
        for batch in loader:
            batch = _to_device(batch, self.dist.device)
            output = self.engine(**batch)
            correct, supervised, exact, rows = answer_accuracy(output["logits"], output["merged_labels"])
            totals += torch.tensor([float(output["loss"]) * supervised, supervised, correct, exact, rows, 1.0],
                                   dtype=torch.float64)
        if self.dist.world_size > 1:
            totals = totals.to(self.dist.device)
            torch.distributed.all_reduce(totals)
            totals = totals.cpu()
        self.engine.train()
        loss_sum, supervised, correct, exact, rows, _ = totals.tolist()
        row = {"step": step, "epoch": epoch, "eval_loss": loss_sum / max(1.0, supervised),
               "eval_accuracy": correct / max(1.0, supervised), "eval_exact_match": exact / max(1.0, rows),
               "eval_samples": int(rows)}
        self.metrics.write(row)
        self.on_log(row)
        return row
