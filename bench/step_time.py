"""Step time of ``vitacore.Trainer`` (DeepSpeed ZeRO-0) against a plain PyTorch loop, side by side.

One process builds the embedded default model twice from the same seed, as a stage run builds it
(``vitacore.StageRecipe(config).build_parts()``: the stage-1 freeze policy on both, so only the vision
projector trains), and then alternates, for ``--rounds`` rounds:

  (a) the stage run's ``recipe.build_trainer().fit()`` for ``--warmup + --steps`` optimizer steps, and
  (b) a hand-written loop: ``torch.optim.AdamW`` on the same parameter groups, the same
      schedule (``build_scheduler``), the same sampler / batch size / collator, ``loss.backward()``,
      ``clip_grad_norm_``, ``optimizer.step()``, ``scheduler.step()``, ``zero_grad()``.

Both sides are timed the same way: a post-hook on the optimizer stamps the clock after every
optimizer step, and the time per step is (stamp[warmup + steps] - stamp[warmup]) / steps. That span
holds everything a step costs in each loop (data loading, collation, forward, backward, clipping,
the update, logging bookkeeping) and nothing that happens once (engine set-up, the first step).
The order alternates between rounds so neither side always runs on a warmer machine.

    python bench/step_time.py [--steps 800] [--rounds 3] [--batch_size 8] [--warmup 10] [--threads 0]

The first run builds the embedded default into $VITACORE_CACHE (about 30 s, once).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from ratios import print_summary  # noqa: E402  (bench/ is on sys.path when run as a script)
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

import vitacore  # noqa: E402
from vitacore.engine.schedule import build_scheduler, warmup_steps_for  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="timed optimizer steps per round and side")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs both sides once")
    parser.add_argument("--batch_size", type=int, default=8, help="per-device micro-batch")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before the timed ones")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if min(args.steps, args.rounds, args.batch_size) < 1 or args.warmup < 1:
        parser.error("--steps, --rounds, --batch_size and --warmup must be >= 1")
    return args


def make_config(args, output_dir: str, stage_key: str = "1") -> vitacore.RunConfig:
    """A stage of the embedded default with the benchmark's settings as flags, as
    ``examples/train_stage.py --stage <key> --per_device_train_batch_size ...`` parses them (the stage's
    preset fills in everything else when :class:`vitacore.StageRecipe` resolves it)."""
    return vitacore.parse_args([
        "--stage", stage_key, "--output_dir", output_dir,
        "--per_device_train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", "1",
        "--max_steps", str(args.warmup + args.steps),
        "--logging_steps", str(10**9),  # only the final step writes a metrics row
        "--eval_strategy", "no", "--save_strategy", "no",
    ])


def build(config) -> vitacore.StageRecipe:
    """Every part of the stage run, built as ``examples/train_stage.py`` builds them
    (:meth:`vitacore.StageRecipe.build_parts`): the embedded default with the stage's freeze policy, its
    parameter groups (``recipe.param_groups``), the data (``recipe.data``) and the checkpointer."""
    recipe = vitacore.StageRecipe(config)
    recipe.build_parts()
    return recipe


def trainer_in(recipe: vitacore.StageRecipe, output_dir: str) -> vitacore.Trainer:
    """The stage run's Trainer (:meth:`vitacore.StageRecipe.build_trainer`), writing to ``output_dir``: each
    round is a run of its own, with its own folder (nothing to resume, a fresh ``metrics.jsonl``)."""
    run = recipe.checkpointer
    checkpointer = vitacore.Checkpointer(dataclasses.replace(recipe.specs.checkpoint, output_dir=output_dir),
                                         recipe.dist, run.artifacts, write_run_config=run.write_run_config)
    return recipe.build_trainer(checkpointer=checkpointer)


def per_step_seconds(stamps: list[float], warmup: int, steps: int) -> tuple[float, float]:
    """(mean seconds per timed step over the whole span, median of the single-step durations).

    The mean is the throughput figure; the median shrugs off bursts of load from other processes.
    """
    if len(stamps) < warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} optimizer steps, saw {len(stamps)}")
    timed = stamps[warmup - 1:warmup + steps]
    durations = [b - a for a, b in zip(timed, timed[1:])]
    return (timed[-1] - timed[0]) / steps, statistics.median(durations)


def run_vitacore(recipe, output_dir: str, args) -> tuple[tuple[float, float], int]:
    """``Trainer.fit()`` for warmup + steps optimizer steps; returns (s/step, text tokens in timed steps)."""
    model = recipe.model
    trainer = trainer_in(recipe, output_dir)
    stamps: list[float] = []
    trainer.engine.optimizer.register_step_post_hook(lambda *a: stamps.append(time.perf_counter()))
    tokens: list[int] = []
    model_hook = model.register_forward_pre_hook(
        lambda m, a, kw: tokens.append(int(kw["attention_mask"].sum())) if m.training else None, with_kwargs=True)
    try:
        result = trainer.fit()
    finally:
        model_hook.remove()
    assert result.num_steps == args.warmup + args.steps
    return per_step_seconds(stamps, args.warmup, args.steps), sum(tokens[args.warmup:args.warmup + args.steps])


def run_raw(recipe, model, groups, data, args) -> tuple[tuple[float, float], int]:
    """The same steps as a plain PyTorch loop (the stage run's loop and optimizer settings, ``recipe.specs``);
    returns (s/step, text tokens in timed steps)."""
    loop, o = recipe.specs.loop, recipe.specs.optim
    total = args.warmup + args.steps
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "param_names"} for g in groups], lr=o.learning_rate,
        betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon, weight_decay=o.weight_decay)
    scheduler = build_scheduler(optimizer, o.lr_scheduler_type, warmup_steps_for(total, o.warmup_steps, o.warmup_ratio),
                                total, o.lr_scheduler_kwargs)
    sampler = DistributedSampler(data.train, num_replicas=1, rank=0, shuffle=True, seed=loop.seed, drop_last=False)
    loader = DataLoader(data.train, batch_size=loop.per_device_train_batch_size, sampler=sampler,
                        collate_fn=data.collator, num_workers=loop.dataloader_num_workers)
    stamps: list[float] = []
    optimizer.register_step_post_hook(lambda *a: stamps.append(time.perf_counter()))
    tokens: list[int] = []
    model.train()
    step, epoch = 0, 0
    while step < total:
        sampler.set_epoch(epoch)
        for batch in loader:
            output = model(**batch)
            loss = output["loss"]
            loss.backward()
            loss_value = loss.item()
            if not torch.isfinite(torch.tensor(loss_value)):
                raise RuntimeError(f"non-finite loss at step {step + 1}")
            if o.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens.append(int(batch["attention_mask"].sum()))
            step += 1
            if step >= total:
                break
        epoch += 1
    return per_step_seconds(stamps, args.warmup, args.steps), sum(tokens[args.warmup:total])


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    out = tempfile.mkdtemp(prefix="vitacore-bench-")
    config = make_config(args, out)
    dist = vitacore.init_distributed()
    print(f"building the embedded default twice (cache: {os.environ.get('VITACORE_CACHE', '~/.cache/vitacore')}) ...",
          flush=True)
    recipe_a = build(config)  # the vitacore side: its Trainer comes from recipe_a.build_trainer()
    recipe_b = build(config)  # the raw side: the same build, timed through a hand-written loop
    bundle_a, groups_a, policy, stage = recipe_a.bundle, recipe_a.param_groups, recipe_a.policy, recipe_a.stage
    bundle_b, groups_b = recipe_b.bundle, recipe_b.param_groups
    same = all(torch.equal(p, q) for p, q in zip(bundle_a.model.parameters(), bundle_b.model.parameters()))
    if not same:
        raise RuntimeError("the two builds differ; the comparison would not be like for like")
    data = recipe_a.data  # both sides read this dataset and collator
    trainable = sum(p.numel() for g in groups_a for p in g["params"])
    total = sum(p.numel() for p in bundle_a.model.parameters())
    print(f"model: the embedded default, {total:,} parameters, {trainable:,} trainable (stage {stage.key}: "
          f"{', '.join(policy.trained_units())}); fp32 on {dist.device.type}, "
          f"{torch.get_num_threads()} torch threads; {len(data.train)} training samples")
    print(f"each side: {args.warmup} warm-up + {args.steps} timed optimizer steps, micro-batch {args.batch_size}, "
          f"no accumulation, clipping {recipe_a.specs.optim.max_grad_norm}, {args.rounds} rounds\n")

    means = {"vitacore": [], "raw": []}
    medians = {"vitacore": [], "raw": []}
    rates = {"vitacore": [], "raw": []}
    for round_index in range(args.rounds):
        order = ("vitacore", "raw") if round_index % 2 == 0 else ("raw", "vitacore")
        for side in order:
            if side == "vitacore":
                (mean, median), n_tokens = run_vitacore(recipe_a, os.path.join(out, f"round{round_index}"), args)
            else:
                (mean, median), n_tokens = run_raw(recipe_b, bundle_b.model, groups_b, data, args)
            means[side].append(mean)
            medians[side].append(median)
            rates[side].append(n_tokens / (mean * args.steps))
        print(f"round {round_index + 1} ({' then '.join(order)}): "
              f"vitacore {means['vitacore'][-1] * 1e3:7.2f} ms/step   raw {means['raw'][-1] * 1e3:7.2f} ms/step   "
              f"ratio {means['vitacore'][-1] / means['raw'][-1]:.3f}",
              flush=True)

    print()
    ratios = print_summary(print, "vitacore", "raw", means, medians, "text tokens/s",
                           {side: (rates[side], "14,.0f") for side in ("vitacore", "raw")},
                           "a tiny model on CPU is overhead-dominated (Python, DeepSpeed bookkeeping, the data "
                           "pipeline); these ratios say nothing about large-model throughput.", started)
    print(f"ratio vitacore/raw step time: {statistics.median(ratios):.2f} (median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
