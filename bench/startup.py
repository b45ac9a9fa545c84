"""Start-up with the length cache, and loader-worker memory with the record store, side by side.

(a) **Time to the first optimizer step** of a stage run (``vitacore.StageRecipe``, the embedded
    default, stage 4) on ``--records`` synthetic VITA records (text, image and audio records over
    a few small generated media files) with ``--group_by_modality_length True``, so every start
    needs every record's length. Each start is a Python process of its own:

    * *fresh*: no length cache (the folder beside the data is deleted first): the lengths are
      counted (in parallel) and the cache written; the run saves ``checkpoint-1``;
    * *warm*: another start on the same data, in a new output folder: the cache is read;
    * *resumed*: a copy of the fresh run's folder, one step more (``--allow_resume_changes
      max_steps``): it resumes from ``checkpoint-1`` and reads the cache.

    One fresh start, then ``--rounds`` warm and resumed starts, alternating which goes first. Each
    is timed from the start of ``StageRecipe(config)`` to the post-hook of the first optimizer step;
    the modules a run imports on the way (DeepSpeed, transformers' model code, peft) are imported
    before the clock starts, since they cost the same in every start (the time from launch is
    printed too). Printed, on medians: resumed / warm (target <= 1.1), fresh / warm (target >= 5).

(b) **Loader-worker memory**: ``--workers`` forked ``DataLoader`` workers iterate one epoch over
    ``--memory_records`` text records, once with the records as a ``list[dict]`` (with per-record
    origin and dataset-name strings, as the data used to be held) and once as the run now holds them
    (``RecordStore``, ``RecordOrigins``, ``CodedStrings``), through the real ``VitaJsonDataset``.
    Growth is each worker's private memory (USS: ``Private_Clean + Private_Dirty`` of
    ``/proc/<pid>/smaps_rollup``) at the end of the epoch minus at its start (read in the worker's
    ``worker_init_fn``), summed over the workers. Plain RSS does not grow when a shared page is
    copied on write, so it is printed only beside. Printed: lean / list (target <= 0.3).

    python bench/startup.py [--part both|time|memory] [--records 100000] [--rounds 3]
                            [--memory_records 200000] [--workers 4] [--batch_size 64]

Smaller sizes for development: ``--records 10000 --memory_records 20000``. Needs Linux (``/proc``).
The first run builds the embedded default into $VITACORE_CACHE (about 30 s, once).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402

_WORDS = ("red", "blue", "green", "square", "circle", "tone", "what", "is", "the", "shown", "moving", "left",
          "right", "picture", "sound", "high", "low", "describe", "colour", "shape")
_CHILD_MARK = "STARTUP_RESULT "


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("both", "time", "memory"), default="both", help="which measurement")
    parser.add_argument("--records", type=int, default=100_000, help="records of the start-up runs (a)")
    parser.add_argument("--rounds", type=int, default=3, help="warm and resumed starts each, after one fresh start (a)")
    parser.add_argument("--memory_records", type=int, default=200_000, help="records of the worker-memory part (b)")
    parser.add_argument("--workers", type=int, default=4, help="loader workers of part (b)")
    parser.add_argument("--batch_size", type=int, default=64, help="loader batch size of part (b)")
    parser.add_argument("--keep", default=None, help="folder to generate into and keep (default: a temporary one)")
    # One start of part (a), run in a process of its own by the parent.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", help=argparse.SUPPRESS)
    parser.add_argument("--max_steps", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.records, args.rounds, args.memory_records, args.workers, args.batch_size) < 1:
        parser.error("every count must be >= 1")
    return args


# ---- synthetic data ------------------------------------------------------------------------------

def _question(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 40)))


def synthetic_records(count: int, media: dict, seed: int = 0) -> list[dict]:
    """``count`` VITA records, a third each text, image and audio (``media``: kind -> relative paths)."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        kind = ("text", "image", "audio")[i % 3] if media else "text"
        question, answer = _question(rng), _question(rng)
        record = {"id": f"{kind}{i:07d}"}
        if kind == "image":
            record["image"] = rng.choice(media["image"])
            question = "<image>\n" + question
        elif kind == "audio":
            record["audio"] = [rng.choice(media["audio"])]
            question = "<audio>\n" + question
        record["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        records.append(record)
    return records


def write_media(root: str) -> dict:
    """A few small images (several sizes, so tiling differs) and WAV clips under ``root``."""
    from PIL import Image

    from vitacore.data.audio import write_wav

    os.makedirs(os.path.join(root, "media"), exist_ok=True)
    media = {"image": [], "audio": []}
    for i, (width, height) in enumerate(((64, 64), (128, 64), (64, 192), (200, 120))):
        rel = f"media/img{i}.png"
        Image.new("RGB", (width, height), (40 * i, 90, 200 - 40 * i)).save(os.path.join(root, rel))
        media["image"].append(rel)
    for i, seconds in enumerate((0.5, 1.0, 2.0, 3.5)):
        rel = f"media/aud{i}.wav"
        tone = 0.3 * np.sin(np.arange(int(16000 * seconds)) * (0.05 + 0.02 * i)).astype(np.float32)
        write_wav(os.path.join(root, rel), tone, 16000)
        media["audio"].append(rel)
    return media


# ---- (a) time to the first step ------------------------------------------------------------------

# What a stage run imports on the way (lazily): imported before the clock starts, since they cost the
# same in every start (about 20 s on a loaded 2-core machine) and have nothing to do with the data.
_RUN_IMPORTS = ("vitacore", "deepspeed", "deepspeed.runtime.engine", "peft", "bitsandbytes", "accelerate",
                "transformers.optimization", "transformers.trainer_utils", "transformers.models.qwen2.modeling_qwen2",
                "soundfile", "av")


def run_child(args) -> int:
    """One start: build the stage run, fit, report the seconds to the first optimizer step."""
    import importlib

    recipe_started = time.time()
    for name in _RUN_IMPORTS:
        importlib.import_module(name)
    import vitacore
    from vitacore.console import enable_console

    enable_console()  # the length cache's notes (read, or counted and written) reach the parent
    imported = time.time()
    flags = ["--stage", "4", "--data_path", args.data, "--output_dir", args.output_dir,
             "--group_by_modality_length", "True", "--max_steps", str(args.max_steps),
             "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
             "--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "no",
             "--logging_steps", str(10**9), "--dataloader_num_workers", "0",
             "--allow_resume_changes", "max_steps"]
    started = time.time()
    recipe = vitacore.StageRecipe(vitacore.parse_args(flags))
    recipe.build_parts()
    built = time.time()
    trainer = recipe.build_trainer()  # the sampler, so the lengths, are made here
    ready = time.time()
    stamps: list[float] = []
    trainer.engine.optimizer.register_step_post_hook(lambda *a: stamps.append(time.time()))
    result = trainer.fit()
    print(_CHILD_MARK + json.dumps({"first_step_s": stamps[0] - started, "import_s": imported - recipe_started,
                                    "since_launch_s": stamps[0] - args.launched, "steps": result.num_steps,
                                    "phases_s": [built - started, ready - built, stamps[0] - ready]}),
          flush=True)
    return 0


def _start(data: str, output_dir: str, max_steps: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--data", data, "--output_dir", output_dir,
           "--max_steps", str(max_steps), "--launched", repr(time.time())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_CHILD_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the start failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    notes = [line.strip() for line in proc.stdout.splitlines() if "modality lengths of" in line]
    return {**json.loads(lines[-1][len(_CHILD_MARK):]), "notes": notes}


def time_to_first_step(args, root: str) -> dict:
    media = write_media(root)
    data = os.path.join(root, "train.json")
    with open(data, "w") as fh:
        json.dump(synthetic_records(args.records, media), fh)
    print(f"(a) {args.records:,} records in {data} ({os.path.getsize(data) / 2**20:.1f} MiB); stage 4 of the "
          "embedded default, --group_by_modality_length True, one process, 0 loader workers", flush=True)
    for leftover in os.listdir(root):  # a kept folder from an earlier run: start with no cache, no runs
        if leftover == ".vitacore_lengths" or leftover.startswith("run-"):
            shutil.rmtree(os.path.join(root, leftover))
    runs = {"fresh": [_start(data, os.path.join(root, "run-fresh"), 1)]}
    _say("fresh", runs["fresh"][-1])
    runs.update(warm=[], resumed=[])
    for round_index in range(args.rounds):  # warm and resumed alternate which goes first
        for name in ("warm", "resumed") if round_index % 2 == 0 else ("resumed", "warm"):
            output = os.path.join(root, f"run-{name}-{round_index}")
            if name == "resumed":  # the fresh run's folder as it was: checkpoint-1, one step more to go
                shutil.copytree(os.path.join(root, "run-fresh"), output)
            runs[name].append(_start(data, output, 2 if name == "resumed" else 1))
            _say(name, runs[name][-1])
    median = {name: statistics.median(run["first_step_s"] for run in found) for name, found in runs.items()}
    launch = {name: statistics.median(run["since_launch_s"] for run in found) for name, found in runs.items()}
    ratios = {"resumed/warm": median["resumed"] / median["warm"], "fresh/warm": median["fresh"] / median["warm"]}
    print(f"  medians: fresh {median['fresh']:.2f} s, warm {median['warm']:.2f} s, resumed {median['resumed']:.2f} s "
          f"({args.rounds} warm and resumed starts each)")
    print(f"  ratio resumed/warm: {ratios['resumed/warm']:.2f} (target <= 1.1)")
    print(f"  ratio fresh/warm:   {ratios['fresh/warm']:.2f} (target >= 5)")
    print(f"  (from launch, imports included: resumed/warm {launch['resumed'] / launch['warm']:.2f}, "
          f"fresh/warm {launch['fresh'] / launch['warm']:.2f})", flush=True)
    return ratios


def _say(name: str, run: dict) -> None:
    parts, trainer, step = run["phases_s"]
    print(f"  {name:8s} first step after {run['first_step_s']:7.2f} s = model and data {parts:.1f} s + trainer "
          f"(engine, sampler) {trainer:.1f} s + fit to the first step {step:.1f} s (imports before it "
          f"{run['import_s']:.1f} s; {run['since_launch_s']:.1f} s after launch)"
          + "".join(f"\n           {note}" for note in run["notes"]), flush=True)


# ---- (b) worker memory ---------------------------------------------------------------------------

def _memory_kib(pid: int) -> dict:
    """USS (private clean + dirty) and RSS of ``pid`` in KiB, from ``/proc/<pid>/smaps_rollup``."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
    return {"uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0), "rss": fields.get("Rss", 0)}


class _StartMemory:
    """A ``worker_init_fn`` that writes each worker's pid and memory at its start to a folder."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, worker_id: int) -> None:
        with open(os.path.join(self.folder, f"worker-{worker_id}.json"), "w") as fh:
            json.dump({"pid": os.getpid(), **_memory_kib(os.getpid())}, fh)


def _epoch_growth(dataset, collator, args, folder: str) -> dict:
    """Summed growth (KiB) of the workers' USS and RSS over one epoch of ``dataset``."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collator, num_workers=args.workers,
                        persistent_workers=True, worker_init_fn=_StartMemory(folder),
                        sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))
    started, num_samples = time.time(), 0
    iterator = iter(loader)
    for batch in iterator:
        num_samples += len(batch["sample_ids"])
    assert num_samples == len(dataset)
    growth = {"uss": 0, "rss": 0}
    for worker in range(args.workers):
        with open(os.path.join(folder, f"worker-{worker}.json")) as fh:
            start = json.load(fh)
        end = _memory_kib(start["pid"])
        for key in growth:
            growth[key] += end[key] - start[key]
    del iterator, loader
    return {**growth, "seconds": time.time() - started}


def worker_memory(args, root: str) -> float:
    import gc
    import warnings

    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: meant
    from vitacore.data.conversation import get_template
    from vitacore.data.dataset import Collator, VitaJsonDataset
    from vitacore.data.record_store import CodedStrings, RecordOrigins, RecordStore
    from vitacore.demo.tokenizer import build_tokenizer

    tokenizer, template = build_tokenizer(), get_template("qwen2p5_instruct")
    collator = Collator(tokenizer.pad_token_id)
    count = args.memory_records
    path = os.path.join(root, "memory.json")
    print(f"\n(b) {count:,} text records, {args.workers} loader workers (fork), batch {args.batch_size}, one epoch "
          "each side", flush=True)
    results = {}
    for side in ("list", "lean"):
        records = synthetic_records(count, {}, seed=1)
        if side == "list":  # as the data used to be held: dicts, and a string per record for each column
            dataset = VitaJsonDataset(records, root, tokenizer, template, None, None, source=path,
                                      origins=[f"{path}, record {i}" for i in range(count)],
                                      dataset_names=["memory"] * count)
        else:
            store = RecordStore.from_records(records)
            del records
            dataset = VitaJsonDataset(store, root, tokenizer, template, None, None, source=path,
                                      origins=RecordOrigins([f"{path}, record "], np.zeros(count, np.int32),
                                                            np.arange(count, dtype=np.int64)),
                                      dataset_names=CodedStrings(np.zeros(count, np.int32), ["memory"]))
        gc.collect()
        results[side] = _epoch_growth(dataset, collator, args, tempfile.mkdtemp(dir=root))
        print(f"  {side:5s} worker growth over the epoch, summed over {args.workers} workers: "
              f"USS {results[side]['uss'] / 1024:8.1f} MiB   RSS {results[side]['rss'] / 1024:8.1f} MiB   "
              f"({results[side]['seconds']:.0f} s)", flush=True)
        del dataset
    ratio = max(results["lean"]["uss"], 0) / max(results["list"]["uss"], 1)
    print(f"  ratio lean/list (USS growth): {ratio:.3f} (target <= 0.3)")
    return ratio


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        return run_child(args)
    started = time.time()
    root = args.keep or tempfile.mkdtemp(prefix="vitacore-startup-")
    os.makedirs(root, exist_ok=True)
    try:
        if args.part in ("both", "time"):
            time_to_first_step(args, root)
        if args.part in ("both", "memory"):
            worker_memory(args, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"(total wall time {time.time() - started:.0f}s; {os.cpu_count()} CPUs, 1-min load average at the end "
          f"{load:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
