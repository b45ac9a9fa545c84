"""The stage recipe: the one place a stage run is composed, top to bottom.

    parse -> resolve the stage -> derive typed configs -> model -> freeze policy -> param groups
          -> data -> checkpointer -> Trainer -> fit -> final artifacts

``recipe_main`` is what ``examples/train_stage.py`` runs. In a script::

    recipe = StageRecipe(vitacore.parse_args(["--stage", "2"]))
    recipe.setup()            # every part built; recipe.model, recipe.data, recipe.trainer, ...
    result = recipe.train()
    recipe.cleanup(result)    # final artifacts and the summary lines
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Optional, Sequence

from vitacore.checkpoint import Checkpointer, StageArtifacts
from vitacore.config import RunConfig, ignored_flag_notes, parse_args, validate
from vitacore.console import enable_console, logger
from vitacore.data import build_data
from vitacore.engine import NonFiniteLossError, Trainer, TrainResult, init_distributed, resolve_deepspeed_config
from vitacore.freeze import build_report, format_report, param_groups_for_run, policy_from_config
from vitacore.model import UNIT_PREFIXES, VitaModel, prepare_for_training
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
    """

    def __init__(self, config: RunConfig, demo_output: Optional[str] = None):
        self.started = time.time()
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
        """The model (frozen, grouped, reported), then the data and the checkpointer (not with ``--dry_run``)."""
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
            for note in self.notes:
                logger.info(f"note: {note}")
            logger.info("dry run: nothing trained")
            return
        self._setup_data()
        artifacts = StageArtifacts(self.model, frozenset(self.policy.trained_units()), self.bundle.tokenizer,
                                   self.config.training.lora_bias)
        self.checkpointer = Checkpointer(self.specs.checkpoint, dist, artifacts, write_run_config=self.config.to_yaml)

    def build_trainer(self, train_dataset=None, checkpointer: Optional[Checkpointer] = None) -> Trainer:
        """The Trainer over the built parts; ``train_dataset`` / ``checkpointer`` replace the run's training
        set / output folder (tests, benchmarks that run the same parts several times)."""
        trainer = Trainer(self.model, self.param_groups, train_dataset or self.data.train, self.data.collator,
                          self.dist, loop=self.specs.loop, optim=self.specs.optim,
                          deepspeed_config=self.deepspeed_config, checkpointer=checkpointer or self.checkpointer,
                          eval_dataset=self.data.eval, eval_generation=self.eval_generation)
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
        """Fit (resuming from the newest checkpoint where there is one)."""
        return self.trainer.fit()

    def cleanup(self, result: TrainResult) -> dict[str, str]:
        """Write the final artifacts and ``config.yaml``, and report the run; returns ``{artifact: path}``."""
        artifacts = self.checkpointer.save_final()
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
        written = {**artifacts, "metrics.jsonl": os.path.join(output_dir, "metrics.jsonl"),
                   "checkpoint": self.checkpointer.latest()}
        for path in written.values():
            if path and os.path.exists(path):
                logger.info(f"wrote {path} ({_size(path):,} bytes)")
        return artifacts


def run_stage(config: RunConfig, demo_output: Optional[str] = None) -> TrainResult | None:
    """Set up, train and clean up one stage; None for a dry run."""
    recipe = StageRecipe(config, demo_output).setup()
    if recipe.trainer is None:
        return None
    result = recipe.train()
    recipe.cleanup(result)
    return result


def run_all_stages(config: RunConfig) -> None:
    """Stages 1 -> 2 -> 3 -> 4 on the embedded default, each from the previous stages' artifacts.

    Stage ``k`` writes to ``output/demo-stage-k`` (or ``<--output_dir>/stage-k``).

    Raises:
        ValueError: the run names its own model or data (chain its stages one ``--stage`` at a time).
    """
    if not uses_embedded_default(config):
        raise ValueError("--stage all chains the demo stages of the embedded default model; with your own "
                         "--model_name_or_path / --vision_tower / --audio_encoder run each --stage in turn")
    pattern = os.path.join(config.training.output_dir, "stage-{stage}") if config.is_explicit("output_dir") else None
    for key in CHAINED_STAGES:
        stage_config = copy.deepcopy(config)
        stage_config.stage = key
        if pattern is not None:  # each stage's folder comes from the pattern, not the flag
            stage_config.set("output_dir", stage_config.training.output_dir, None)
        run_stage(stage_config, demo_output=pattern)


def recipe_main(argv: Optional[Sequence[str]] = None) -> int:
    """``examples/train_stage.py``: parse the flags, run the stage (or ``--stage all``); the exit code.

    Bad flags, files or data, and a diverged loss print ``error: ...`` without a traceback (exit 2).
    """
    enable_console()
    try:
        config = parse_args(argv)
        if config.stage == "all":
            run_all_stages(config)
        else:
            run_stage(config)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


if __name__ == "__main__":
    sys.exit(recipe_main())
