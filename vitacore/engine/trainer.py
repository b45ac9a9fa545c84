"""The Trainer: DeepSpeed initialized here; ``fit`` -> ``train_step`` -> ``evaluate`` owned here.

It receives typed parts and builds nothing else: the model (already built, frozen and prepared for
the run), its param groups, the datasets and collator, :class:`LoopConfig` and :class:`OptimConfig`,
the complete DeepSpeed config, and the :class:`~vitacore.checkpoint.Checkpointer` that owns the
output folder.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vitacore import ranks
from vitacore.checkpoint import Checkpointer, run_identity
from vitacore.console import logger
from vitacore.data.bad_samples import BadSampleLog
from vitacore.engine import step_checks as checks
from vitacore.engine.config import LoopConfig, OptimConfig
from vitacore.engine.distributed import DistInfo
from vitacore.engine.evaluation import GenerationEval, evaluate
from vitacore.engine.loader import (
    AccumulationGroup,
    accumulation_groups,
    build_train_loader,
    loss_divisor,
    run_length,
    to_device,
)
from vitacore.engine.metrics import MetricsLog, MetricsWindow, format_lr, sample_token_losses
from vitacore.engine.optimizer import build_optimizer
from vitacore.engine.outcomes import NonFiniteGradientError, NonFiniteLossError, StepOutcome, TrainResult
from vitacore.engine.plots import CurveRedraws
from vitacore.engine.schedule import build_scheduler, rebase_schedule, warmup_steps_for
from vitacore.engine.signals import StopRequest
from vitacore.engine.trackers import Trackers
from vitacore.model.zero3_view import module_for_engine


class Trainer:
    """Trains one model on one dataset: builds the DeepSpeed engine and loops over the data.

    Args:
        model: the model; its forward takes a collated batch and returns ``loss`` (and ``logits``).
        param_groups: optimizer groups (each with ``params``, ``lr``, ``weight_decay``, ``name``).
        train_dataset: map-style dataset of samples; ``collate_fn`` batches them.
        collate_fn: list of samples -> batch dict.
        dist: the process's place in the job.
        loop: batches, run length, logging, evaluation and checkpoint cadence.
        optim: AdamW, clipping and the LR schedule.
        deepspeed_config: the complete DeepSpeed config (:func:`vitacore.engine.resolve_deepspeed_config`);
            a ZeRO-3 model must have been built under the same config.
        checkpointer: the output folder's owner (checkpoints, resume, artifacts); ``metrics.jsonl`` goes
            beside its checkpoints.
        eval_dataset: held-out samples for :meth:`evaluate` (None: no evaluation).
        on_log: called with every metrics row.
        eval_generation: with ``loop.eval_generate``, the eval set's prompts to answer at each evaluation.
        stop: the run's signal handling (a recipe holds one over the whole run; None: ``fit`` has its own).

    Raises:
        ValueError: fp16 on a CPU; ranks that see different training data or resolved different
            loop / optimizer / DeepSpeed configs (every rank raises, naming what differs).
    """

    def __init__(self, model: torch.nn.Module, param_groups: list[dict], train_dataset: Dataset,
                 collate_fn: Callable, dist: DistInfo, *, loop: LoopConfig, optim: OptimConfig,
                 deepspeed_config: dict, checkpointer: Checkpointer, eval_dataset: Optional[Dataset] = None,
                 on_log: Optional[Callable[[dict], None]] = None, eval_generation: Optional[GenerationEval] = None,
                 stop: Optional[StopRequest] = None):
        if dist.device.type == "cpu" and deepspeed_config.get("fp16", {}).get("enabled"):
            raise ValueError("--fp16 True is not supported on CPU (DeepSpeed refuses fp16 there); "
                             "use --bf16 True or drop the flag for fp32")
        checks.check_same_run(dist, train_dataset, {"loop config": loop, "optimizer config": optim,
                                                    "DeepSpeed config": deepspeed_config})
        self.model = model
        self.param_groups = param_groups
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.eval_generation = eval_generation
        self.collate_fn = collate_fn
        self.dist = dist
        self.loop = loop
        self.optim = optim
        self.ds_config = deepspeed_config
        self.checkpointer = checkpointer
        self.on_log = on_log or (lambda row: None)
        self.stop = stop or StopRequest()
        self.metrics = MetricsLog(checkpointer.output_dir, enabled=dist.is_main)
        # Every dataset the records name, the same list on every rank (per-dataset losses line up).
        self.dataset_names = sorted({name for name in getattr(train_dataset, "dataset_names", None) or () if name})
        self.bad_samples = BadSampleLog(loop.max_bad_sample_ratio, dist.is_main,
                                        min_samples=loop.min_samples_for_bad_ratio)
        self.curves = CurveRedraws(checkpointer.output_dir, loop.plot_loss and dist.is_main)
        self.notes: list[str] = []
        self.trackers = Trackers.create(loop.report_to, loop.run_name, checkpointer.output_dir, dist.is_main,
                                        checkpointer.resume_path is not None, self.notes,  # resumed: known now
                                        config={"loop": loop, "optim": optim, "deepspeed": deepspeed_config})
        self._accepts_num_items = "num_items_in_batch" in inspect.signature(model.forward).parameters

        self.sampler, self.loader, self.loader_generator = build_train_loader(train_dataset, collate_fn, loop, dist)
        self.micro_in_epoch, self.total_steps = run_length(self.sampler, loop)  # packing: a count per epoch
        self.warmup_steps = warmup_steps_for(self.total_steps, optim.warmup_steps, optim.warmup_ratio)
        self.base_lrs = [float(group["lr"]) for group in param_groups]  # before the schedule scales them
        self.engine = self._initialize()
        self.identity = run_identity(model, dist.world_size,
                                     [loop.per_device_train_batch_size, loop.gradient_accumulation_steps], loop.seed)
        self.step = 0  # optimizer steps done
        self.num_skipped_steps = 0  # micro-batches (non-finite loss) and steps (non-finite gradients) skipped

    def _initialize(self):
        import deepspeed  # seconds to import: paid when a Trainer is built, not by `import vitacore`

        optim = self.optim
        schedule = (optim.lr_scheduler_type, self.warmup_steps, self.total_steps, optim.lr_scheduler_kwargs)
        build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), *schedule)  # bad kwargs: now
        # Under ZeRO-3 the engine gets a view without the frozen encoders and adapters (kept whole).
        module = module_for_engine(self.model.to(self.dist.device), self.ds_config, self.loop.zero3_frozen_parts)
        kwargs = {"model": module, "config": self.ds_config, "dist_init_required": False}
        if "optimizer" in self.ds_config:
            kwargs["model_parameters"] = self.param_groups
            if optim.optim != "adamw_torch":
                self.notes.append(f"--optim {optim.optim} is not used: the DeepSpeed config's optimizer block "
                                  f"({self.ds_config['optimizer'].get('type')}) builds the optimizer")
        else:
            kwargs["optimizer"] = build_optimizer(self.param_groups, optim, self.dist.device.type)
        # A callable, so DeepSpeed hands it the (possibly wrapped) optimizer; per-group LRs survive.
        kwargs["lr_scheduler"] = lambda optimizer: build_scheduler(optimizer, *schedule)
        engine, _, _, _ = deepspeed.initialize(**kwargs)
        if self.dist.world_size == 1 and engine.zero_optimization_stage() == 0:
            # One process, no ZeRO: the gradient all-reduce has no peer; skip flattening for it.
            engine.enable_backward_allreduce = False
        return engine

    # ---- the loop -------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to ``total_steps`` optimizer steps, evaluating and checkpointing as configured.

        Resumes from the checkpoint the checkpointer chose. SIGTERM / SIGINT finish the current
        optimizer step, save a checkpoint, and return with ``stopped_by`` set (the caller writes the
        final artifacts). A non-finite loss or gradient norm raises :class:`NonFiniteLossError` naming
        the step, or skips that micro-batch / optimizer step while ``loop.skip_nonfinite_steps`` allows.
        """
        bar = tqdm(total=self.total_steps, desc=self.loop.progress_label, disable=not self.dist.is_main,
                   dynamic_ncols=True)
        try:
            with self.stop as stop:
                return self._fit(bar, stop)
        finally:
            bar.close()
            self.trackers.close()

    def _fit(self, bar, stop: StopRequest) -> TrainResult:
        loop = self.loop
        position = self._resume()
        self.step, self.num_skipped_steps = position["step"], position["num_skipped_steps"]
        epoch, next_micro, stopped_by = position["epoch"], position["micro_in_epoch"], None
        window = MetricsWindow()
        if position["window"]:
            window.load_state_dict(position["window"])
        bar.update(self.step)
        self.engine.train()
        started = time.time()
        if self.step >= self.total_steps:
            return self._finish(epoch, next_micro, started, stopped_by)
        groups = accumulation_groups(self.loader, self.sampler, self.loader_generator, loop, self.micro_in_epoch,
                                     position["epoch"], position["micro_in_epoch"])
        ready = time.perf_counter()
        for group in groups:
            window.data_wait += time.perf_counter() - ready  # the loader's share of the step
            epoch, next_micro = group.epoch, group.next_micro
            outcome = self.train_step(group, window, stop)
            ready = time.perf_counter()
            self.step += 1
            bar.update(1)
            window.steps += 1
            grad_norm = outcome.grad_norm
            epoch_progress = self._epoch_progress(epoch, next_micro)
            if self.step % loop.logging_steps == 0 or self.step == self.total_steps:
                row = window.row(self.step, epoch_progress, format_lr(self._group_lrs()), grad_norm, self.dist,
                                 self.dataset_names)
                rejected = len(getattr(self.train_dataset, "rejected", ()))
                if rejected:  # records dropped when the data was read (--on_bad_sample skip)
                    row["bad_records_at_load"] = rejected
                self._log(row)
                # Totals over ranks, so every rank raises at the same step.
                self.bad_samples.add(row["bad_samples"], window.global_samples)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                window = MetricsWindow()
            if outcome.stop_requested:  # every rank saw the same flag in the same collective
                stopped_by = stop.signal_name
                self._log({"step": self.step, "epoch": epoch_progress, "event": "stopped", "signal": stopped_by})
            if outcome.stop_requested or self.step >= self.total_steps:
                if loop.save_strategy != "no":
                    self.save(epoch, next_micro, window)
                break
            if self._should_eval(group.closes_epoch) and "eval_stopped" in self.evaluate(self.step, epoch_progress):
                stopped_by = stop.signal_name  # the ranks agreed in the evaluation loop
                if loop.save_strategy != "no":
                    self.save(epoch, next_micro, window)
                break
            save_requested = stop.take_save_request()  # SIGUSR1, agreed in train_step's collective
            if self._save_due(group.closes_epoch) or save_requested:
                self.save(epoch, next_micro, window)
        return self._finish(epoch, next_micro, started, stopped_by)

    def train_step(self, group: AccumulationGroup, window: MetricsWindow, stop: StopRequest) -> StepOutcome:
        """One optimizer step over an accumulation group: forward and backward per micro-batch, then step.

        Before the first forward the ranks agree on whether each read its group (a bad record one
        rank alone drew stops every rank here). Per micro-batch, in one collective, they agree on
        whether the loss is finite and whether a stop was asked for. vitacore owns the accumulation
        boundary, so a short group at an epoch's end still steps; a group whose micro-batches were
        all skipped does not step, and a non-finite gradient norm skips the step
        (:meth:`_optimizer_step`).

        Raises:
            the group's read error on the rank that had it, :class:`vitacore.ranks.PeerRankError` on the others.
            NonFiniteLossError: a NaN / inf loss past ``loop.skip_nonfinite_steps`` skips.
            NonFiniteGradientError: a NaN / inf gradient norm past the same number of skips.
        """
        ranks.agree(group.failure, f"reading the training data for optimizer step {self.step + 1}")
        engine, accumulation = self.engine, self.loop.gradient_accumulation_steps
        divisor = loss_divisor(group.batches, self.dist, accumulation) if self._accepts_num_items else None
        stop_requested, contributed = False, False
        for offset, batch in enumerate(group.batches):
            closes = offset + 1 == len(group.batches)
            engine.set_gradient_accumulation_boundary(closes)
            window.bad += self.bad_samples.observe(batch)  # takes the markers out of the batch
            batch = to_device(batch, self.dist.device)
            if divisor is not None:
                batch["num_items_in_batch"] = divisor
            output = engine(**batch)
            loss = output["loss"]
            finite, stop_requested = self._agree(loss, stop)
            if finite:
                if "token_losses" in output and "sample_modalities" in batch:
                    window.add_breakdown(*sample_token_losses(output["token_losses"], output["targets"],
                                                              output.get("segment_ids")),
                                         batch["sample_modalities"], batch["sample_datasets"])
                del output  # logits (on the full-logits path): free before backward
                engine.backward(loss)
                contributed = True
                window.flops += getattr(self.model, "last_flops", 0.0)
                # Summed over the group's micro-batches and ranks, this is the group's token-mean loss.
                share = loss.item() / accumulation if divisor is not None else loss.item()
                window.add(share, batch, share_of_step=divisor is not None)
            elif self.num_skipped_steps < self.loop.skip_nonfinite_steps:
                self.num_skipped_steps += 1  # every rank skips this micro-batch's backward together
            else:
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at optimizer step {self.step + 1} (epoch {group.epoch}, micro-batch "
                    f"{group.first_micro + offset + 1}, samples {batch.get('sample_ids')}); lower --learning_rate, "
                    f"check the data, or allow skips with --skip_nonfinite_steps N")
            if not closes:
                if finite:
                    engine.step()  # between boundaries DeepSpeed only counts the micro-batch
            elif contributed:
                if not finite:  # DeepSpeed reduces the group's gradients in the boundary's backward: run it on
                    engine.backward(loss * 0.0)  # zero (a non-finite gradient then skips the step, counted once)
                return StepOutcome(self._optimizer_step(group, counted=not finite), stop_requested)
        return StepOutcome(None, stop_requested)  # every micro-batch was skipped: no gradient, no step

    def _optimizer_step(self, group: AccumulationGroup, counted: bool) -> Optional[float]:
        """Step at the accumulation boundary unless the global gradient norm is not finite; the (pre-clip) norm.

        A skipped step (:func:`~vitacore.engine.step_checks.step_unless_nonfinite`) is counted
        against ``loop.skip_nonfinite_steps``, with the micro-batches skipped for their loss, unless
        ``counted``: the group's skipped last micro-batch was counted already.
        """
        norm, skipped = checks.step_unless_nonfinite(self.engine, self.param_groups, self.dist)
        if skipped is None:  # fp16 loss scaling skips routinely; DeepSpeed lowers the scale and goes on
            return norm
        if not skipped and not checks.is_finite(norm):
            raise NonFiniteGradientError(
                f"the gradient norm is {norm} at optimizer step {self.step + 1} and DeepSpeed applied the step "
                "(its overflow check is off: \"check_grad_overflow\": false in the DeepSpeed config); the weights "
                "are no longer finite. Turn the check on, lower --learning_rate, or check the data")
        if skipped and not counted:
            where = (f"optimizer step {self.step + 1} (epoch {group.epoch}, micro-batches {group.first_micro + 1}-"
                     f"{group.next_micro})")
            if self.num_skipped_steps >= self.loop.skip_nonfinite_steps:
                raise NonFiniteGradientError(
                    f"the gradient norm is {norm} at {where} while the loss was finite; the step was not applied. "
                    f"Lower --learning_rate, check the data, or allow skips with "
                    f"--skip_nonfinite_steps N ({self.num_skipped_steps} used of {self.loop.skip_nonfinite_steps})")
            self.num_skipped_steps += 1
            if self.dist.is_main:
                logger.warning(f"warning: skipped {where}: the gradient norm is {norm} (the loss was finite); "
                               f"weights and optimizer state unchanged ({self.num_skipped_steps} of "
                               f"--skip_nonfinite_steps {self.loop.skip_nonfinite_steps} skips used)")
        return norm

    def evaluate(self, step: int, epoch: float) -> dict:
        """Loss and teacher-forced answer accuracy on the eval set, summed over ranks; logged and returned."""
        row = evaluate(self.engine, self.eval_dataset, self.collate_fn, self.loop, self.dist,
                       token_model=hasattr(self.model, "llm"), generation=self.eval_generation, stop=self.stop)
        if "eval_stopped" in row:
            self._log({"step": step, "epoch": epoch, "event": "stopped", "signal": self.stop.signal_name,
                       "during": "evaluation"})
            return row
        row = {"step": step, "epoch": epoch, **row}
        self._log(row)
        if self.dist.is_main:  # shown as it happens, not only in metrics.jsonl
            shown = (f"{key.removeprefix('eval_')} {value:.4g}" if isinstance(value, float) else
                     f"{key.removeprefix('eval_')} {value}" for key, value in row.items() if key.startswith("eval_"))
            logger.info(f"eval at step {step}: {', '.join(shown)}")
        return row

    def save(self, epoch: int, micro_in_epoch: int, window: MetricsWindow) -> str:
        """Write ``checkpoint-<step>`` at the current optimizer step (every rank calls this).

        Raises:
            ValueError: on every rank, naming a trainable parameter that holds NaN / inf (nothing written).
        """
        position = {"step": self.step, "epoch": epoch, "micro_in_epoch": micro_in_epoch,
                    "num_skipped_steps": self.num_skipped_steps, "window": window.state_dict(),
                    "bad_samples": self.bad_samples.state_dict()}
        state = {"position": position, "identity": self.identity, "total_steps": self.total_steps}
        with ranks.together(f"checking the weights before writing checkpoint-{self.step}"):
            name = checks.first_nonfinite_weight(self.model)
            if name is not None:  # a checkpoint must resume a healthy run; the earlier ones stay
                raise ValueError(f"not writing checkpoint-{self.step}: the trainable parameter {name} holds NaN or "
                                 "infinite values; resume from an earlier checkpoint with a lower --learning_rate")
        path = self.checkpointer.save(self.engine, self.step, state)
        self._log({"step": self.step, "event": "checkpoint", "path": path})
        self.curves.at_checkpoint()
        return path

    # ---- helpers --------------------------------------------------------------------------------

    def _resume(self) -> dict:
        """Restore the checkpoint the checkpointer chose (if any); the loop position to start at."""
        state = self.checkpointer.load(self.engine, self.identity)
        if state is None:
            aside = self.metrics.reset()  # a fresh run starts a fresh log
            if aside:
                logger.info(f"note: {self.metrics.path} of an earlier run moved to {aside}")
            return {"step": 0, "epoch": 0, "micro_in_epoch": 0, "num_skipped_steps": 0, "window": None}
        position = state["position"]
        rebase_schedule(self.engine.lr_scheduler, self.base_lrs)  # an allowed --learning_rate change applies
        self.bad_samples.load_state_dict(position.get("bad_samples"))
        if position["micro_in_epoch"] >= self.micro_in_epoch(position["epoch"]):
            position.update(epoch=position["epoch"] + 1, micro_in_epoch=0)
        logger.info(f"note: resumed from {self.checkpointer.resume_path} at step {position['step']} of "
                    f"{self.total_steps} (epoch {position['epoch']}, micro-batch {position['micro_in_epoch']} of "
                    f"{self.micro_in_epoch(position['epoch'])}; no data replayed)")
        self._log({"step": position["step"], "event": "resumed", "path": self.checkpointer.resume_path})
        return position

    def _agree(self, loss: torch.Tensor, stop: StopRequest) -> tuple[bool, bool]:
        """(loss finite on every rank, a stop was requested on some rank), in one collective."""
        flags = [0.0 if bool(torch.isfinite(loss)) else 1.0, *stop.local_flags()]  # + [stop, SIGUSR1 save]
        if self.dist.world_size > 1:
            reduced = torch.tensor(flags, device=self.dist.device)
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
            flags = reduced.tolist()
        stop.settle(flags[1:])
        return not flags[0], bool(flags[1])

    def _group_lrs(self) -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.engine.optimizer.param_groups)}

    def _save_due(self, end_of_epoch: bool) -> bool:
        strategy = self.loop.save_strategy
        return (strategy == "steps" and self.step % self.loop.save_steps == 0) or (strategy == "epoch" and end_of_epoch)

    def _should_eval(self, end_of_epoch: bool) -> bool:
        if self.eval_dataset is None or self.step >= self.total_steps:
            return False
        if self.loop.eval_strategy == "epoch":
            return end_of_epoch
        if self.loop.eval_strategy == "steps":
            return self.step % (self.loop.eval_steps or self.loop.logging_steps) == 0
        return False

    def _finish(self, epoch: int, next_micro: int, started: float, stopped_by: Optional[str]) -> TrainResult:
        final_eval = {}
        if self.eval_dataset is not None and stopped_by is None:
            final_eval = self.evaluate(self.step, self._epoch_progress(epoch, next_micro))
            if "eval_stopped" in final_eval:  # the final checkpoint is already saved
                stopped_by, final_eval = self.stop.signal_name, {}
        self.curves.at_end()
        train_rows = [r for r in self.metrics.rows if "loss" in r]
        return TrainResult(self.step, time.time() - started, train_rows[0]["loss"] if train_rows else None,
                           train_rows[-1]["loss"] if train_rows else None, final_eval, self.metrics.rows,
                           stopped_by, self.num_skipped_steps)

    def _log(self, row: dict) -> None:
        self.metrics.write(row)
        self.trackers.write(row)
        self.on_log(row)

    def _epoch_progress(self, epoch: int, micro: int) -> float:
        return round(epoch + micro / max(1, self.micro_in_epoch(epoch)), 4)
