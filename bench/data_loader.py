"""Data loading throughput: 0 vs N loader workers, and data time against stage 4's training step.

One process builds the embedded default and stage 4's training data (the synthetic image, video,
audio and text records), then, for ``--rounds`` rounds, alternating which goes first:

  (a) a ``DataLoader`` with 0 workers and one with ``--workers`` workers (persistent, prefetching)
      over the same seeded shuffled order, each timed over ``--batches`` batches after one
      untimed batch (worker start-up is a one-off cost, not throughput);
  (b) the stage run's ``recipe.build_trainer().fit()`` (``vitacore.StageRecipe``) of stage 4 for
      ``--warmup + --steps`` optimizer steps, timed
      as ``bench/step_time.py`` times it (a post-hook on the optimizer stamps every step).

It prints samples/s for both loaders, their ratio, and data time per batch (0 workers, the
Trainer's default) over the training step time, all medians over rounds.

    python bench/data_loader.py [--batches 60] [--steps 15] [--warmup 3] [--rounds 3] [--workers 2] [--threads 0]

The first run builds the embedded default into $VITACORE_CACHE (about 30 s, once).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_time import build, make_config, per_step_seconds, trainer_in  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=60, help="timed batches per loader and round")
    parser.add_argument("--steps", type=int, default=15, help="timed training steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps before the timed ones")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each times every side once")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the second loader")
    parser.add_argument("--batch_size", type=int, default=8, help="per-device micro-batch")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if min(args.batches, args.steps, args.warmup, args.rounds, args.workers, args.batch_size) < 1:
        parser.error("every count must be >= 1")
    return args


def loader_samples_per_s(data, args, workers: int, seed: int) -> float:
    """Samples/s of a loader with ``workers`` workers over ``--batches`` batches after a first one."""
    options = {"num_workers": workers}
    if workers:
        options.update(persistent_workers=True, prefetch_factor=2)
    sampler = RandomSampler(data.train, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(data.train, batch_size=args.batch_size, sampler=sampler, collate_fn=data.collator,
                        **options)
    batches = iter(loader)
    next(batches)  # worker start-up and the first fetch: one-off, not throughput
    samples, started = 0, time.perf_counter()
    for _ in range(args.batches):
        try:
            batch = next(batches)
        except StopIteration:  # a short dataset: start the next pass (persistent workers stay)
            batches = iter(loader)
            batch = next(batches)
        samples += batch["input_ids"].shape[0]
    seconds = time.perf_counter() - started
    del batches, loader  # shut the workers down before the next side runs
    return samples / seconds


def train_step_seconds(recipe, output_dir: str, args) -> float:
    """Mean seconds per timed stage-4 optimizer step of the stage run's ``Trainer.fit()`` (0 loader workers)."""
    trainer = trainer_in(recipe, output_dir)
    stamps: list[float] = []
    trainer.engine.optimizer.register_step_post_hook(lambda *a: stamps.append(time.perf_counter()))
    trainer.fit()
    return per_step_seconds(stamps, args.warmup, args.steps)[0]


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    out = tempfile.mkdtemp(prefix="vitacore-bench-data-")
    config = make_config(args, out, stage_key="4")  # stage 4 reads every media kind
    print(f"building the embedded default (cache: {os.environ.get('VITACORE_CACHE', '~/.cache/vitacore')}) ...",
          flush=True)
    recipe = build(config)  # the stage run's parts: model, freeze policy, param groups, data, checkpointer
    policy, stage, data = recipe.policy, recipe.stage, recipe.data
    print(f"stage {stage.key} ({', '.join(policy.trained_units())} train), {len(data.train)} samples "
          f"({', '.join(stage.demo_data.train)}), micro-batch {args.batch_size}, {torch.get_num_threads()} torch "
          f"threads, {os.cpu_count()} CPUs; {args.batches} timed batches per loader, {args.warmup} + {args.steps} "
          f"training steps, {args.rounds} rounds\n", flush=True)

    w = args.workers
    rates = {0: [], w: []}
    steps: list[float] = []
    for round_index in range(args.rounds):
        order = (0, w) if round_index % 2 == 0 else (w, 0)
        for workers in order:
            rates[workers].append(loader_samples_per_s(data, args, workers, seed=round_index))
        steps.append(train_step_seconds(recipe, os.path.join(out, f"round{round_index}"), args))
        print(f"round {round_index + 1}: 0 workers {rates[0][-1]:7.1f} samples/s   {w} workers "
              f"{rates[w][-1]:7.1f} samples/s   training step {steps[-1] * 1e3:7.1f} ms", flush=True)

    rate0, rate_w, step = (statistics.median(v) for v in (rates[0], rates[w], steps))
    data_per_batch = args.batch_size / rate0
    print()
    print(f"samples/s, 0 workers: {rate0:.1f}")
    print(f"samples/s, {w} workers: {rate_w:.1f}")
    print(f"ratio {w} workers / 0 workers (samples/s): {rate_w / rate0:.2f}")
    print(f"data time per batch (0 workers): {data_per_batch * 1e3:.1f} ms; stage {stage.key} training step: "
          f"{step * 1e3:.1f} ms")
    print(f"ratio data time per batch / training step time: {data_per_batch / step:.2f} "
          f"(the step includes loading its batch: 0 workers, the Trainer's default)")
    print(f"medians of {args.rounds} rounds; tiny model on CPU, so the data share is far larger than on a GPU run "
          f"with a real model. wall time {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
