"""Step time of ``vitacore.Trainer`` against the Hugging Face ``transformers.Trainer``, both on ZeRO-3.

Both sides get the same work: the embedded default model at stage 1 (built fresh for each side and
round, from the same seed, partitioned at construction), the same freeze policy and parameter
groups, ``torch.optim.AdamW`` over those groups, the same schedule, the same completed
DeepSpeed config (``configs/zero3.json`` with its ``"auto"`` values filled by
``vitacore.resolve_deepspeed_config``), the same dataset and collator, micro-batch and accumulation,
and the same number of optimizer steps. Only the loop differs:

  (a) ``vitacore.Trainer(...).fit()``, built as a stage run builds it (``vitacore.StageRecipe``:
      ``build_parts()`` then ``build_trainer()``);
  (b) ``transformers.Trainer(...).train()``, with ``create_optimizer`` / ``create_scheduler``
      overridden to return the AdamW over vitacore's groups and the same ``LambdaLR``.

Timing: both loops drive a ``deepspeed.DeepSpeedEngine``; the script wraps that class's
``_take_model_step`` (the optimizer update at an accumulation boundary; once per optimizer step on
either side) to stamp the clock when it returns. The time per step is
(stamp[warmup + steps] - stamp[warmup]) / steps: everything a step costs in each loop (data loading,
collation, forward, backward, the ZeRO-3 gathers and reductions, the update, logging bookkeeping),
and nothing that happens once (model build, engine set-up, the first steps). The order of the two
sides alternates between rounds.

    python bench/hf_trainer.py [--steps 150] [--warmup 10] [--rounds 5] [--nproc 1]
    python bench/hf_trainer.py --nproc 2     # relaunches itself: torchrun --nproc_per_node 2 (gloo, 1 thread each)

Run directly under ``torchrun --nproc_per_node 2 bench/hf_trainer.py --nproc 2`` it does not relaunch
(set ``DS_ACCELERATOR=cpu OMP_NUM_THREADS=1`` yourself then). The first run ever builds the embedded
default into $VITACORE_CACHE (about 30 s, once).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO3 = os.path.join(REPO, "configs", "zero3.json")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="timed optimizer steps per round and side (default: 150 with 1 process, 100 with 2)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed optimizer steps before the timed ones")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each runs both sides once")
    parser.add_argument("--nproc", type=int, default=1, choices=(1, 2), help="processes (2: relaunch under torchrun)")
    parser.add_argument("--batch_size", type=int, default=8, help="per-process micro-batch")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    args = parser.parse_args(argv)
    given = argv or sys.argv[1:]
    if "WORLD_SIZE" in os.environ and not any(a == "--nproc" or a.startswith("--nproc=") for a in given):
        args.nproc = int(os.environ["WORLD_SIZE"])  # launched by torchrun (or relaunched without the flag)
    if args.steps is None:
        args.steps = 150 if args.nproc == 1 else 100
    if min(args.steps, args.rounds, args.batch_size, args.accumulation) < 1 or args.warmup < 1:
        parser.error("--steps, --rounds, --batch_size, --accumulation and --warmup must be >= 1")
    return args


def relaunch(argv: list[str]) -> int:
    """Run this script again under ``torchrun --nproc_per_node 2`` (CPU, gloo, one thread per process).

    ``--nproc`` is left out of the child's flags: torchrun's own parser rejects it as an ambiguous
    abbreviation of ``--nproc-per-node``; the child reads the process count from ``WORLD_SIZE``.
    """
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            kept.append(token)
    argv = kept
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.abspath(__file__), *argv]
    print("relaunching: DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 " + " ".join(command[1:]), flush=True)
    return subprocess.call(command, env=env)


# ---------------------------------------------------------------------------------------------------
# After this point the script runs in every process of the job.

import torch  # noqa: E402
from ratios import print_summary  # noqa: E402  (bench/ is on sys.path when run as a script)

import vitacore  # noqa: E402
from vitacore.engine.schedule import build_scheduler, warmup_steps_for  # noqa: E402
from vitacore.recipes import build_run_model, model_inputs, plan_model, start_weights  # noqa: E402

STAMPS: list[float] = []
GC_PAUSES: list[tuple[float, float]] = []  # (start, end) of every cyclic-GC pass, generation 2 included
_gc_started = [0.0]


def _gc_callback(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        GC_PAUSES.append((_gc_started[0], time.perf_counter()))


def gc_seconds_between(start: float, end: float) -> float:
    """Seconds the cyclic garbage collector ran inside [start, end]."""
    return sum(b - a for a, b in GC_PAUSES if a >= start and b <= end)


def install_step_stamp() -> None:
    """Stamp the clock whenever any DeepSpeed engine finishes an optimizer update (both loops use one)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._take_model_step
    if getattr(original, "_bench_stamped", False):
        return

    def stamped(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        STAMPS.append(time.perf_counter())
        return result

    stamped._bench_stamped = True
    DeepSpeedEngine._take_model_step = stamped


def quiet(*args, **kwargs) -> None:
    pass


def make_recipe(args, output_dir: str) -> vitacore.StageRecipe:
    """Stage 1 of the embedded default on ZeRO-3, with the benchmark's batch and step counts as flags
    (the stage preset fills in the rest); the recipe is resolved and validated, nothing is built yet."""
    return vitacore.StageRecipe(vitacore.parse_args([
        "--stage", "1", "--output_dir", output_dir, "--deepspeed", ZERO3,
        "--per_device_train_batch_size", str(args.batch_size),
        "--gradient_accumulation_steps", str(args.accumulation), "--max_steps", str(args.warmup + args.steps),
        "--logging_steps", str(10**9),  # vitacore: only the final step writes a metrics row
        "--eval_strategy", "no", "--save_strategy", "no",
    ]))


def hf_parts(recipe: vitacore.StageRecipe, dist, make_training_args):
    """The parts :meth:`vitacore.StageRecipe.build_parts` builds (same config, same steps), for the HF side.

    The DeepSpeed config is resolved as the recipe resolves it and handed to ``make_training_args``, which
    creates the HF ``TrainingArguments`` before the model exists. The model is then built with no DeepSpeed
    config of its own: the live ``HfDeepSpeedConfig`` of those ``TrainingArguments`` makes the ZeRO-3
    construction, as HF users do. Returns (training_args, bundle, groups, policy, data).
    """
    plan = plan_model(recipe.config)
    specs = vitacore.derive_specs(plan.config, plan.assets, recipe.stage.demo_data,
                                  from_export=plan.exported is not None)
    ds_config, _ = vitacore.resolve_deepspeed_config(
        specs.deepspeed, loop=specs.loop, optim=specs.optim, world_size=dist.world_size,
        hidden_size=plan.hidden_size, bf16=specs.bf16, fp16=specs.fp16)
    # Created BEFORE the model: its HfDeepSpeedConfig is what makes from_pretrained build partitioned.
    hf_args = make_training_args(ds_config)
    bundle = build_run_model(specs.model, plan.exported, start_weights(plan.config), None)
    policy = vitacore.policy_from_config(plan.config)
    policy.apply(bundle.model, vitacore.UNIT_PREFIXES)
    groups = vitacore.param_groups_for_run(bundle.model, vitacore.UNIT_PREFIXES, specs.optim)
    data = vitacore.build_data(specs.data, bundle.tokenizer, model_inputs(bundle.model))
    return hf_args, bundle, groups, policy, data


def trainable(model, groups) -> tuple[int, frozenset]:
    """(trainable parameter count, names), before any engine exists; ZeRO-3 counts ``ds_numel``.

    Taken before training: DeepSpeed rewrites the optimizer's ``params`` lists in place.
    """
    in_groups = {id(p) for g in groups for p in g["params"]}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if {id(p) for _, p in named} != in_groups:
        raise RuntimeError("the param groups do not hold exactly the trainable parameters")
    return sum(getattr(p, "ds_numel", p.numel()) for _, p in named), frozenset(n for n, _ in named)


def built_partitioned(model) -> bool:
    """True when the LLM came out of the build already partitioned (ZeRO-3 construction); call it before
    any engine exists (``deepspeed.initialize`` partitions whatever it is given)."""
    return all(hasattr(p, "ds_id") for p in model.llm.parameters())


def per_step_seconds(stamps: list[float], warmup: int, steps: int) -> tuple[float, float, float]:
    """(mean seconds per timed step over the whole span, median single-step duration, cyclic-GC seconds
    per timed step)."""
    if len(stamps) < warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} optimizer steps, saw {len(stamps)}")
    timed = stamps[warmup - 1:warmup + steps]
    durations = [b - a for a, b in zip(timed, timed[1:])]
    return ((timed[-1] - timed[0]) / steps, statistics.median(durations),
            gc_seconds_between(timed[0], timed[-1]) / steps)


def engine_settings(engine) -> dict:
    """The config DeepSpeed ended up with (for the like-for-like check)."""
    if isinstance(getattr(engine, "config", None), dict):
        return dict(engine.config)
    return dict(engine._config._param_dict)


def run_vitacore(args, dist, out: str) -> dict:
    recipe = make_recipe(args, out)
    recipe.build_parts()  # as a stage run: the model built partitioned under the resolved ZeRO-3 config
    groups, policy, data = recipe.param_groups, recipe.policy, recipe.data
    count, names = trainable(recipe.model, groups)
    partitioned = built_partitioned(recipe.model)
    trainer = recipe.build_trainer()
    STAMPS.clear()
    GC_PAUSES.clear()
    result = trainer.fit()
    stamps = list(STAMPS)
    assert result.num_steps == args.warmup + args.steps, result.num_steps
    return {"timing": per_step_seconds(stamps, args.warmup, args.steps), "loss": result.last_loss,
            "trainable": count, "names": names, "partitioned": partitioned,
            "units": policy.trained_units(), "samples": len(data.train),
            "settings": engine_settings(trainer.engine),
            "optimizer": type(trainer.engine.optimizer.optimizer).__name__}


def run_hf(args, dist, out: str) -> dict:
    import transformers

    recipe = make_recipe(args, out)
    t = recipe.config.training
    total = t.max_steps
    warmup = warmup_steps_for(total, t.warmup_steps, t.warmup_ratio)

    def training_args(ds_config: dict):
        return transformers.TrainingArguments(
            output_dir=out, deepspeed=ds_config, use_cpu=dist.device.type == "cpu",
            per_device_train_batch_size=t.per_device_train_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps, max_steps=total,
            learning_rate=t.learning_rate, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon, max_grad_norm=t.max_grad_norm,
            lr_scheduler_type=t.lr_scheduler_type, logging_steps=10**9, save_strategy="no", eval_strategy="no",
            report_to=[], remove_unused_columns=False, dataloader_num_workers=t.dataloader_num_workers,
            seed=t.seed, bf16=t.bf16, fp16=t.fp16,
        )

    # The TrainingArguments exist (and hold the HfDeepSpeedConfig) before the model is built.
    hf_args, bundle, groups, policy, data = hf_parts(recipe, dist, training_args)
    model = bundle.model
    count, names = trainable(model, groups)
    partitioned = built_partitioned(model)
    # vitacore.prepare_for_training (StageRecipe.build_parts) turns this on with several processes (every
    # encoder runs every step, so no rank waits in a collective for a module another skipped); the HF Trainer
    # does not know the flag, so it is set here by the same rule: both sides do the same work.
    model.run_all_encoders = dist.world_size > 1

    class GroupsTrainer(transformers.Trainer):
        """The HF Trainer with vitacore's param groups and schedule (DeepSpeed ignores ``optimizers=``)."""

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                                   eps=t.adam_epsilon, weight_decay=t.weight_decay)
            return self.optimizer

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = build_scheduler(optimizer or self.optimizer, t.lr_scheduler_type, warmup, total)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    trainer = GroupsTrainer(model=model, args=hf_args, train_dataset=data.train, data_collator=data.collator)
    STAMPS.clear()
    GC_PAUSES.clear()
    with contextlib.redirect_stdout(io.StringIO()):  # the HF Trainer prints its end-of-training metrics dict
        output = trainer.train()
    stamps = list(STAMPS)
    assert trainer.state.global_step == total, trainer.state.global_step
    engine = trainer.model_wrapped
    return {"timing": per_step_seconds(stamps, args.warmup, args.steps), "loss": output.training_loss,
            "trainable": count, "names": names, "partitioned": partitioned,
            "units": policy.trained_units(), "samples": len(data.train),
            "settings": engine_settings(engine), "optimizer": type(engine.optimizer.optimizer).__name__}


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two (nested) DeepSpeed configs."""
    diffs = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(x, dict) and isinstance(y, dict):
            diffs += config_differences(x, y, f"{prefix}{key}.")
        elif x != y:
            diffs.append(f"{prefix}{key}: vitacore {x!r}, HF {y!r}")
    return diffs


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    launched = "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
    if args.nproc == 2 and not launched:
        return relaunch(argv)
    started = time.time()
    import transformers

    transformers.logging.set_verbosity_error()
    dist = vitacore.init_distributed()
    if dist.world_size != args.nproc:
        raise SystemExit(f"--nproc {args.nproc} but the job has {dist.world_size} process(es)")
    say = print if dist.is_main else quiet
    install_step_stamp()
    gc.callbacks.append(_gc_callback)
    out = tempfile.mkdtemp(prefix="vitacore-bench-hf-")
    say(f"vitacore vs transformers.Trainer {transformers.__version__}: ZeRO-3 ({os.path.relpath(ZERO3, REPO)}, "
        f"'auto' filled by vitacore.resolve_deepspeed_config), {dist.world_size} process(es) on {dist.device.type}, "
        f"{torch.get_num_threads()} torch thread(s) each; embedded default at stage 1, fp32", flush=True)
    say(f"each side: {args.warmup} warm-up + {args.steps} timed optimizer steps, micro-batch {args.batch_size}, "
        f"accumulation {args.accumulation}, {args.rounds} rounds; a fresh model per side and round\n", flush=True)

    means = {"vitacore": [], "HF": []}
    medians = {"vitacore": [], "HF": []}
    gc_times = {"vitacore": [], "HF": []}
    last: dict[str, dict] = {}
    try:
        for round_index in range(args.rounds):
            order = ("vitacore", "HF") if round_index % 2 == 0 else ("HF", "vitacore")
            for side in order:
                run = run_vitacore if side == "vitacore" else run_hf
                # The previous side's model and engine are garbage (in reference cycles): collect them now,
                # not during the next side's timed steps.
                gc.collect()
                result = run(args, dist, os.path.join(out, f"{side}-{round_index}"))
                mean, median, gc_time = result["timing"]
                means[side].append(mean)
                medians[side].append(median)
                gc_times[side].append(gc_time)
                last[side] = result
                torch.distributed.barrier()
            say(f"round {round_index + 1} ({' then '.join(order)}): "
                f"vitacore {means['vitacore'][-1] * 1e3:8.2f} ms/step   HF {means['HF'][-1] * 1e3:8.2f} ms/step   "
                f"ratio {means['vitacore'][-1] / means['HF'][-1]:.3f}", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)

    v, h = last["vitacore"], last["HF"]
    say()
    same = v["trainable"] == h["trainable"] and v["names"] == h["names"]
    say(f"trainable parameters: vitacore {v['trainable']:,} in {len(v['names'])} tensors ({', '.join(v['units'])}), "
        f"HF {h['trainable']:,} in {len(h['names'])} tensors ({', '.join(h['units'])}) -> "
        f"{'same parameters' if same else 'DIFFERENT'}")
    say(f"LLM built partitioned (ZeRO-3 construction): vitacore {v['partitioned']}, HF {h['partitioned']}; "
        f"inner optimizer: vitacore {v['optimizer']}, HF {h['optimizer']}; {v['samples']} training samples")
    diffs = config_differences(v["settings"], h["settings"])
    say("DeepSpeed engine configs: " + ("identical" if not diffs else "differ in " + "; ".join(diffs)))
    whose = "" if dist.world_size == 1 else "; HF's is rank 0's own, and the ranks' batches are split differently"
    say(f"mean training loss over the {args.warmup + args.steps} steps of the last round, each loop's own figure "
        f"(sanity check, need not match exactly{whose}): vitacore {v['loss']:.6f}, HF {h['loss']:.6f}\n")
    ratios = print_summary(say, "vitacore", "HF", means, medians, "GC ms/step",
                           {side: ([t * 1e3 for t in gc_times[side]], "14.2f") for side in ("vitacore", "HF")},
                           "the tiny default on CPU is overhead-dominated (Python, DeepSpeed ZeRO-3 hooks and "
                           "gathers, the data pipeline); these ratios say nothing about large-model throughput.",
                           started)
    processes = f"{dist.world_size} process{'es' if dist.world_size > 1 else ''}"
    say(f"ratio vitacore/HF Trainer step time (ZeRO-3, {processes}): {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
