"""The stage recipe: the one place a stage run is composed, top to bottom.

    parse -> resolve the stage -> derive typed configs -> model -> freeze policy -> param groups
          -> data -> checkpointer -> Trainer -> fit -> final artifacts

``recipe_main`` is what ``examples/train_stage.py`` runs. In a script::

    recipe = StageRecipe(vitacore.parse_args(["--stage", "2"]))
    recipe.setup()            # every part built; recipe.model, recipe.data, recipe.trainer, ...
    result = recipe.train()
    recipe.cleanup(result)    # final artifacts and the summary lines

Signals: SIGTERM / SIGINT stop the run cleanly (training at the end of the step, evaluation at its
next batch; a checkpoint is saved), and during the final export they wait until it is published;
SIGUSR1 saves a checkpoint and goes on. ``run_status.json`` in the output folder says whether the
run is running, finished, stopped (and by which signal) or failed (and why).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
from typing import Optional, Sequence

import torch

from vitacore.checkpoint import Checkpointer, RunStatus, StageArtifacts
from vitacore.config import RunConfig, ignored_flag_notes, parse_args, validate
from vitacore.console import enable_console, logger
from vitacore.data import build_data
from vitacore.engine import (
    NonFiniteLossError,
    Trainer,
    TrainResult,
    build_scheduler,
    init_distributed,
    resolve_deepspeed_config,
)
from vitacore.engine.signals import StopRequest
from vitacore.freeze import build_report, format_report, param_groups_for_run, policy_from_config
from vitacore.model import UNIT_PREFIXES, VitaModel, prepare_for_training
from vitacore.ranks import mark_failed
from vitacore.recipes.inference import eval_generation
from vitacore.recipes.model import build_run_model, check_select_layer, model_inputs, plan_model, start_weights
from vitacore.recipes.specs import derive_specs
from vitacore.recipes.stages import NO_PRESET, describe_sources, resolve_stage, stage_notes, uses_embedded_default

CHAINED_STAGES = ("1", "2", "3", "4")


class StageRecipe:
    """One stage run. :meth:`setup` builds every part, :meth:`train` fits, :meth:`cleanup` saves and reports.

    Args:
        config: the parsed run config (not modified: the resolved one is :attr:`config`).
        demo_output: output folder pattern of chained demo stages (``{stage}`` is the stage key).
        stop: the signal handling shared by chained stages (None: the recipe's own).
    """

    def __init__(self, config: RunConfig, demo_output: Optional[str] = None, stop: Optional[StopRequest] = None):
        self.started = time.time()
        self.stop = stop or StopRequest()
        self.status: Optional[RunStatus] = None  # run_status.json, once the output folder is known
        self.embedded = uses_embedded_default(config)
        self.stage_given = config.stage is not None
        self.stage, self.config = resolve_stage(config, embedded_default=self.embedded, demo_output=demo_output)
        validate(self.config)
        self.trainer: Optional[Trainer] = None

    @property
    def model(self) -> VitaModel:
        """The run's model (``bundle.model``), once built."""
        return self.bundle.model

    def setup(self) -> "StageRecipe":
        """Build every part and the Trainer (with ``--dry_run``: up to the report; ``trainer`` stays None)."""
        self.build_parts()
        if not self.config.dry_run:
            self.trainer = self.build_trainer()
        return self

    def build_parts(self) -> None:
        """The model (frozen, grouped, reported), then the data and the checkpointer (with ``--dry_run``: the data
        and the DeepSpeed config are checked, no checkpointer is made)."""
        self.dist = dist = init_distributed(self.config.training.ddp_timeout)
        stage = self.stage
        demo = ", embedded default model and data" if self.embedded else ""
        where = f"{dist.world_size} process(es) on {dist.device.type}{demo}"
        if stage is NO_PRESET:
            why = "--stage none" if self.stage_given else "--model_name_or_path given without --stage"
            logger.info(f"vitacore: no stage preset ({why}): the flags alone decide what trains, as in VITA; {where}")
        else:
            default = "" if self.stage_given else "; the default stage without --model_name_or_path"
            logger.info(f"vitacore: stage {stage.key} ({stage.name}: trains {stage.trains}{default}), {where}")
        for note in stage_notes(self.config, stage) + ignored_flag_notes(self.config):
            logger.info(f"note: {note}")
        self._setup_model()
        self._setup_policy()
        if self.config.dry_run:
            # What a real start would refuse, a dry run refuses too: the records (read and validated
            # under --on_bad_sample) and the DeepSpeed config (as deepspeed.initialize reads it).
            self._setup_data()
            from deepspeed.runtime.config import DeepSpeedConfig  # seconds to import: only here

            source = f"--deepspeed {self.specs.deepspeed}" if self.specs.deepspeed else "the built-in DeepSpeed config"
            try:
                DeepSpeedConfig(copy.deepcopy(self.deepspeed_config))
                optim = self.specs.optim
                build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                optim.lr_scheduler_type, 0, 1, optim.lr_scheduler_kwargs)
            except (ValueError, AssertionError, TypeError, KeyError) as err:  # DeepSpeed asserts on some values
                raise ValueError(f"{source} (as completed from the flags) is refused: {err}") from None
            for note in self.notes:
                logger.info(f"note: {note}")
            logger.info(f"dry run: nothing trained ({len(self.data.train)} training records and the DeepSpeed "
                        "config checked)")
            return
        self._setup_data()
        artifacts = StageArtifacts(self.model, frozenset(self.policy.trained_units()), self.bundle.tokenizer,
                                   self.config.training.lora_bias)
        self.checkpointer = Checkpointer(self.specs.checkpoint, dist, artifacts, write_run_config=self.config.to_yaml,
                                         run_config=self.config.flat_dict())
        self.status = RunStatus(self.checkpointer.output_dir, dist.is_main)

    def build_trainer(self, train_dataset=None, checkpointer: Optional[Checkpointer] = None) -> Trainer:
        """The Trainer over the built parts; ``train_dataset`` / ``checkpointer`` replace the run's training
        set / output folder (tests, benchmarks that run the same parts several times)."""
        trainer = Trainer(self.model, self.param_groups, train_dataset or self.data.train, self.data.collator,
                          self.dist, loop=self.specs.loop, optim=self.specs.optim,
                          deepspeed_config=self.deepspeed_config, checkpointer=checkpointer or self.checkpointer,
                          eval_dataset=self.data.eval, eval_generation=self.eval_generation, stop=self.stop,
                          on_log=self.status.observe if checkpointer is None and self.status else None)
        for note in self.notes + trainer.notes:
            logger.info(f"note: {note}")
        return trainer

    def _setup_model(self) -> None:
        plan = plan_model(self.config)  # the LLM's family and size, from its config alone
        self.config, self.assets = plan.config, plan.assets
        self.specs = specs = derive_specs(plan.config, plan.assets, self.stage.demo_data,
                                          from_export=plan.exported is not None)
        self.deepspeed_config, self.notes = resolve_deepspeed_config(
            specs.deepspeed, loop=specs.loop, optim=specs.optim, world_size=self.dist.world_size,
            hidden_size=plan.hidden_size, bf16=specs.bf16, fp16=specs.fp16)
        self.bundle = build_run_model(specs.model, plan.exported, start_weights(plan.config), self.deepspeed_config)
        check_select_layer(self.config.model.mm_vision_select_layer, self.model.vision_tower)
        for part, flag, modality in (("vision_tower", "--vision_tower", "images and video"),
                                     ("audio_encoder", "--audio_encoder", "audio")):
            if getattr(self.model, part) is None:
                logger.info(f"note: no {part} ({flag} not given): the run has no {modality}")
        self.notes += prepare_for_training(self.model, specs.model.gradient_checkpointing, specs.model.tf32,
                                           self.dist.world_size, self.dist.device)

    def _setup_policy(self) -> None:
        self.policy = policy_from_config(self.config, present_units=self.model.unit_modules())
        self.policy.apply(self.model, UNIT_PREFIXES)
        self.param_groups = param_groups_for_run(self.model, UNIT_PREFIXES, self.specs.optim)
        self.report = build_report(self.model, UNIT_PREFIXES, self.policy, self.param_groups)
        logger.info(describe_sources(self.config))
        logger.info(format_report(self.report))
        if self.config.report_json and self.dist.is_main:
            os.makedirs(os.path.dirname(os.path.abspath(self.config.report_json)), exist_ok=True)
            with open(self.config.report_json, "w") as fh:
                json.dump(self.report, fh, indent=2)

    def _setup_data(self) -> None:
        head = self.model.state_head
        if head is not None and any(p.requires_grad for p in head.parameters()):
            raise ValueError("--audio_state_predictor_tuning True: the state head needs per-turn user-state labels, "
                             "which this data pipeline does not produce yet; set it to False")
        self.data = build_data(self.specs.data, self.bundle.tokenizer, model_inputs(self.model))
        self.eval_generation = None  # --eval_generate: the eval set's prompts, answered at each evaluation
        if self.specs.loop.eval_generate and self.data.eval is None:
            logger.info("note: --eval_generate True has no eval set to answer (give --eval_data_path)")
        elif self.specs.loop.eval_generate:
            self.eval_generation = eval_generation(self.data.eval)

    def train(self) -> TrainResult:
        """Fit (resuming from the newest checkpoint where there is one); SIGTERM / SIGINT stop it cleanly."""
        with self.stop:
            self.status.running(self.trainer.total_steps, self.checkpointer.latest())
            return self.trainer.fit()

    def cleanup(self, result: TrainResult) -> dict[str, str]:
        """Write the final artifacts and ``config.yaml``, and report the run; returns ``{artifact: path}``.

        A SIGTERM / SIGINT during the export waits until it is published; the run is then recorded as
        stopped (``result.stopped_by`` is set), as is a run that a signal stopped earlier.
        """
        with self.stop.deferred():
            artifacts = self.checkpointer.save_final()
            # One flag for all ranks: a signal that reached one rank late stops every rank (and a chain).
            if self.stop.agree(self.dist) and not result.stopped_by:
                result.stopped_by = self.stop.signal_name
        latest = self.checkpointer.latest()
        if result.stopped_by:
            self.status.stopped(result.stopped_by, result.num_steps, latest)
        else:
            self.status.finished(result.num_steps, latest)
        if result.stopped_by:
            logger.info(f"\nstopped by {result.stopped_by} after step {result.num_steps}; artifacts saved")
        total = time.time() - self.started
        logger.info(f"\ndone: {result.num_steps} steps in {result.seconds:.1f}s (total {total:.1f}s)")
        if result.first_loss is not None:
            logger.info(f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}")
        if result.final_eval:
            ev = result.final_eval
            logger.info(f"eval: loss {ev['eval_loss']:.4f}, answer-token accuracy {ev['eval_accuracy']:.3f}, "
                        f"exact answers {ev['eval_exact_match']:.3f} ({ev['eval_samples']} held-out samples)")
            if "eval_generate_exact_match" in ev:
                logger.info(f"generated answers: exact match {ev['eval_generate_exact_match']:.3f}, "
                            f"token F1 {ev['eval_generate_f1']:.3f}")
        output_dir = self.checkpointer.output_dir
        written = {**artifacts, "metrics.jsonl": os.path.join(output_dir, "metrics.jsonl"), "checkpoint": latest}
        for path in written.values():
            if path and os.path.exists(path) and self.dist.is_main:  # other ranks would race rank 0's writes
                logger.info(f"wrote {path} ({_size(path):,} bytes)")
        return artifacts

    def record_failure(self, error: BaseException) -> None:
        """Record ``failed`` with the error's message in ``run_status.json`` (once the folder is known)."""
        if self.status is not None:
            text = str(error) or type(error).__name__
            self.status.failed(text if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {text}")


def run_stage(config: RunConfig, demo_output: Optional[str] = None,
              stop: Optional[StopRequest] = None) -> TrainResult | None:
    """Set up, train and clean up one stage; None for a dry run.

    Args:
        config: the run's flags.
        demo_output: see :class:`StageRecipe`.
        stop: the signal handling of a chain of stages (None: this stage's own).
    """
    recipe = StageRecipe(config, demo_output, stop)
    try:
        # Held from set-up on: a signal before training starts stops the run at its first step.
        with recipe.stop:
            recipe.setup()
            if recipe.trainer is None:
                return None
            result = recipe.train()
            recipe.cleanup(result)
    except BaseException as err:
        recipe.record_failure(err)
        raise
    finally:
        if getattr(recipe, "checkpointer", None) is not None:
            recipe.checkpointer.close()  # the output folder's lock
    return result


def run_all_stages(config: RunConfig) -> None:
    """Stages 1 -> 2 -> 3 -> 4 on the embedded default, each from the previous stages' artifacts.

    Stage ``k`` writes to ``output/demo-stage-k`` (or ``<--output_dir>/stage-k``). A stage stopped
    by SIGTERM / SIGINT ends the chain: no later stage starts.

    Raises:
        ValueError: the run names its own model or data (chain its stages one ``--stage`` at a time).
    """
    if not uses_embedded_default(config):
        raise ValueError("--stage all chains the demo stages of the embedded default model; with your own "
                         "--model_name_or_path / --vision_tower / --audio_encoder run each --stage in turn")
    pattern = os.path.join(config.training.output_dir, "stage-{stage}") if config.is_explicit("output_dir") else None
    with StopRequest() as stop:  # one for the chain: a signal between stages is not lost
        for index, key in enumerate(CHAINED_STAGES):
            stage_config = copy.deepcopy(config)
            stage_config.stage = key
            if pattern is not None:  # each stage's folder comes from the pattern, not the flag
                stage_config.set("output_dir", stage_config.training.output_dir, None)
            run_stage(stage_config, demo_output=pattern, stop=stop)
            if stop.agreed:  # every rank agreed at the end of the stage (a later signal: the next stage's first step)
                later = ", ".join(CHAINED_STAGES[index + 1:])
                if later:
                    logger.info(f"stopped by {stop.signal_name}: stage(s) {later} not started")
                return


def recipe_main(argv: Optional[Sequence[str]] = None) -> int:
    """``examples/train_stage.py``: parse the flags, run the stage (or ``--stage all``); the exit code.

    Bad flags, files or data, and a diverged loss print ``error: ...`` without a traceback (exit 2). A
    run stopped by SIGTERM / SIGINT exits 0 once its checkpoint is saved.
    """
    enable_console()
    try:
        config = parse_args(argv)
        if config.stage == "all":
            run_all_stages(config)
        else:
            run_stage(config)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as err:
        mark_failed()  # the exit does not wait for peers in a barrier
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException:
        mark_failed()
        raise
    return 0


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a temporary file renamed meanwhile
                total += os.path.getsize(os.path.join(root, name))
    return total


if __name__ == "__main__":
    sys.exit(recipe_main())
