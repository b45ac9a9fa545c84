"""Supervised tokens per second, packed (``--packing True``) vs padded, side by side in one run.

Two data sets, each trained by the stage run's own Trainer (``vitacore.StageRecipe(...).build_trainer().fit()``)
once per side and round, the order of the sides alternating between rounds:

  (i)  ``demo``: the embedded default at stage 4 on its own data (images, video, audio, text, real
       tiny media files through the real towers), ``--model_max_length 512``;
  (ii) ``mix``: a VITA-like length mix (many short text / image samples, some long video) on a
       wider random Qwen2 LLM (``--hidden``, ``--layers``). Media are *text stand-ins*: each record's
       media become as many plain-text tokens as the media would expand to, so only the LLM runs (the
       encoders' work per sample is the same packed or padded). Lengths are VITA-1.5's scaled by
       ``hidden / 3584`` (Qwen2.5-7B's width), so attention's share of a step stays near VITA's.

Sides: ``padded`` (``--per_device_train_batch_size B``, rows padded to the longest sample),
``grouped`` (the same with ``--group_by_modality_length True``, as VITA's scripts run) and ``packed``
(``--packing True``, rows of up to ``--model_max_length`` tokens, as many rows per micro-batch as
hold about B average samples). A side's figure: supervised target tokens of the timed steps
(labels, segment starts excluded) over the time from the end of warm-up step ``--warmup`` to the
end of the last timed step (optimizer post-hook stamps, as ``step_time.py`` times steps), both in
wall time and in this process's CPU time. With one torch thread (the default) CPU seconds measure the
work done and barely move when other processes share the machine; wall time is what a run waits.
The demo is printed first; the acceptance figure is the mix's packed/padded ratio.

    python bench/packing.py [--rounds 4] [--steps 12] [--warmup 2] [--batch_size 8] [--hidden 512]
                            [--layers 2] [--num_records 2000] [--only demo|mix] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

import vitacore  # noqa: E402
from vitacore.engine.loader import pack_sampler, supervised_targets  # noqa: E402

SIDES = ("padded", "grouped", "packed")
VITA_WIDTH, VITA_MAX_LENGTH = 3584, 6200  # Qwen2.5-7B's hidden size; VITA-1.5's --model_max_length (stages 1-3)
# VITA-1.5-like record kinds in real token counts (an image or video frame: 256 tokens; speech: 25 tokens/s):
# (share, kind, (media tokens low, high), (question tokens low, high), (answer tokens low, high)). The shares
# are this benchmark's assumption of "many short text / image samples, some long video", not measured.
VITA_MIX = (
    (0.45, "image", (256, 256), (10, 120), (5, 300)),  # one image, caption or question
    (0.30, "text", (0, 0), (20, 500), (20, 600)),  # text-only instructions
    (0.15, "audio", (75, 375), (5, 40), (20, 300)),  # a 3-15 s spoken question
    (0.10, "video", (1024, 4096), (10, 120), (30, 300)),  # 4-16 frames
)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds; each runs every side once")
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per round and side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    parser.add_argument("--batch_size", type=int, default=8, help="samples per padded micro-batch")
    parser.add_argument("--hidden", type=int, default=512, help="the mix's LLM width (lengths scale with it)")
    parser.add_argument("--layers", type=int, default=2, help="the mix's LLM layers")
    parser.add_argument("--num_records", type=int, default=2000, help="records of the mix")
    parser.add_argument("--only", choices=("demo", "mix"), help="run one data set only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default); 1 keeps CPU seconds a measure of work")
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps, args.warmup, args.batch_size, args.hidden, args.layers, args.num_records) < 1:
        parser.error("--rounds, --steps, --warmup, --batch_size, --hidden, --layers and --num_records must be >= 1")
    return args


# ---- the VITA-like mix ----------------------------------------------------------------------------

def one_token_words(tokenizer) -> list[str]:
    """Words of the demo corpus that the tokenizer keeps as one token after a space."""
    from vitacore.demo import tokenizer as demo_tokenizer

    with open(os.path.join(os.path.dirname(demo_tokenizer.__file__), "corpus.txt")) as fh:
        corpus = fh.read()
    words = sorted({w.strip(".,;:!?\"'()").lower() for w in corpus.split()} - {""})
    return [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]


def mix_records(num_records: int, scale: float, words: list[str], seed: int = 0) -> list[dict]:
    """VITA-like records with every length multiplied by ``scale``; media as plain-text stand-ins."""
    rng = random.Random(seed)
    shares = [share for share, *_ in VITA_MIX]
    text = lambda n: " ".join(rng.choice(words) for _ in range(max(1, round(n * scale))))  # noqa: E731
    records = []
    for i in range(num_records):
        _, kind, media, question, answer = rng.choices(VITA_MIX, weights=shares)[0]
        media_tokens = rng.randint(*media) if media[1] else 0
        if kind == "video":  # whole frames
            media_tokens = 256 * rng.randint(media[0] // 256, media[1] // 256)
        prompt = (text(media_tokens) + "\n" if media_tokens else "") + text(rng.randint(*question))
        answer_text = text(rng.randint(*answer))
        records.append({"id": f"{kind}{i:05d}", "conversations": [{"from": "human", "value": prompt},
                                                                  {"from": "gpt", "value": answer_text}]})
    return records


def make_llm(folder: str, hidden: int, layers: int, max_length: int) -> str:
    """A random Qwen2 LLM ``hidden`` wide with the embedded default's tokenizer, saved in ``folder``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vitacore.demo.embedded import ensure_default_assets

    source = ensure_default_assets().llm
    config = Qwen2Config.from_pretrained(source)
    heads = max(1, hidden // 64)
    config.update({"hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": layers,
                   "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
                   "max_position_embeddings": max(4096, 2 * max_length), "layer_types": ["full_attention"] * layers})
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    for name in os.listdir(source):
        if name.startswith("tokenizer"):
            shutil.copy(os.path.join(source, name), folder)
    return folder


# ---- one side ---------------------------------------------------------------------------------------

def side_flags(side: str, batch_size: int, packed_rows: int) -> list[str]:
    if side == "packed":
        return ["--packing", "True", "--per_device_train_batch_size", str(packed_rows)]
    return ["--per_device_train_batch_size", str(batch_size), "--group_by_modality_length", str(side == "grouped")]


def build(flags: list[str], output_dir: str) -> vitacore.StageRecipe:
    recipe = vitacore.StageRecipe(vitacore.parse_args([*flags, "--output_dir", output_dir]))
    recipe.build_parts()
    return recipe


def timed_run(recipe: vitacore.StageRecipe, output_dir: str, args) -> tuple[float, float, list[int]]:
    """One ``fit()``: the timed steps' wall seconds, this process's CPU seconds in them, and their
    [supervised tokens, samples, row positions, text tokens].

    Positions and text tokens are counted before media expansion (exact for the mix's text stand-ins).
    """
    run = recipe.checkpointer
    checkpointer = vitacore.Checkpointer(dataclasses.replace(recipe.specs.checkpoint, output_dir=output_dir),
                                         recipe.dist, run.artifacts, write_run_config=run.write_run_config)
    trainer = recipe.build_trainer(checkpointer=checkpointer)
    stamps: list[tuple[float, float]] = []
    trainer.engine.optimizer.register_step_post_hook(lambda *a: stamps.append((time.perf_counter(),
                                                                                time.process_time())))
    seen: list[tuple[int, int, int, int]] = []

    def count(module, _args, kwargs):
        if module.training:
            seen.append((supervised_targets(kwargs), len(kwargs["sample_ids"]), kwargs["input_ids"].numel(),
                         int(kwargs["attention_mask"].sum())))

    hook = recipe.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        result = trainer.fit()
    finally:
        hook.remove()
    total = args.warmup + args.steps
    if result.num_steps != total or len(stamps) < total:
        raise RuntimeError(f"expected {total} optimizer steps, saw {result.num_steps} ({len(stamps)} stamped)")
    timed = seen[args.warmup:total]
    (wall_start, cpu_start), (wall_end, cpu_end) = stamps[args.warmup - 1], stamps[total - 1]
    return wall_end - wall_start, cpu_end - cpu_start, [sum(column) for column in zip(*timed)]


def compare(name: str, common: list[str], args, out: str) -> dict[str, list[float]]:
    """Build each side's recipe, run the rounds, print per-side figures; side -> tokens/s per round."""
    recipes = {side: build([*common, *side_flags(side, args.batch_size, 1)], os.path.join(out, name, side))
               for side in ("padded", "grouped")}
    padded = recipes["padded"]
    lengths = [abs(n) for n in padded.data.train.modality_lengths]
    max_length = padded.specs.model.model_max_length
    # As many packed rows per micro-batch as hold about --batch_size samples (from epoch 0's plan).
    plan = pack_sampler(padded.data.train, dataclasses.replace(padded.specs.loop, packing=True), padded.dist)
    per_pack = len(lengths) / plan.num_samples_in_epoch(0)
    rows = max(1, round(args.batch_size / per_pack))
    recipes["packed"] = build([*common, *side_flags("packed", args.batch_size, rows)],
                              os.path.join(out, name, "packed"))
    quantiles = statistics.quantiles(lengths, n=10)
    print(f"[{name}] {len(lengths)} records; model-input tokens: mean {statistics.mean(lengths):.0f}, median "
          f"{statistics.median(lengths):.0f}, p90 {quantiles[-1]:.0f}, max {max(lengths)}; "
          f"--model_max_length {max_length}; padded sides: {args.batch_size} samples a micro-batch; packed: "
          f"{rows} row(s) of up to {max_length} tokens ({per_pack:.1f} samples a row)", flush=True)
    rates = {clock: {side: [] for side in SIDES} for clock in ("wall", "cpu")}
    for round_index in range(args.rounds):
        order = SIDES if round_index % 2 == 0 else tuple(reversed(SIDES))
        line = []
        for side in order:
            folder = os.path.join(out, name, f"{side}{round_index}")
            seconds, cpu, (tokens, samples, positions, text) = timed_run(recipes[side], folder, args)
            rates["wall"][side].append(tokens / seconds)
            rates["cpu"][side].append(tokens / cpu)
            line.append(f"{side} {tokens / seconds:7.0f} tok/s, {tokens / cpu:7.0f} tok/CPU-s "
                        f"({seconds / args.steps * 1e3:5.0f} ms/step, "
                        f"{samples / args.steps:4.1f} samples/step, {positions / args.steps:5.0f} positions/step, "
                        f"{text / positions:4.0%} filled)")
        print(f"[{name}] round {round_index + 1}: " + "; ".join(line), flush=True)
    for clock, unit in (("wall", "tokens/s"), ("cpu", "tokens per CPU-second")):
        for baseline in ("padded", "grouped"):
            ratios = [p / b for p, b in zip(rates[clock]["packed"], rates[clock][baseline])]
            print(f"[{name}] packed/{baseline} supervised {unit}: per round {', '.join(f'{r:.2f}' for r in ratios)}; "
                  f"median {statistics.median(ratios):.2f}", flush=True)
    return rates["wall"]


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    out = tempfile.mkdtemp(prefix="vitacore-bench-packing-")
    vitacore.init_distributed()
    quiet = ["--logging_steps", str(10**9), "--eval_strategy", "no", "--save_strategy", "no", "--plot_loss", "False",
             "--max_steps", str(args.warmup + args.steps), "--gradient_accumulation_steps", "1"]
    print(f"fp32 on CPU, {torch.get_num_threads()} torch threads; each side: {args.warmup} warm-up + {args.steps} "
          f"timed optimizer steps, {args.rounds} rounds (sides alternate order)\n", flush=True)
    if args.only in (None, "demo"):
        compare("demo", ["--stage", "4", "--model_max_length", "512", *quiet], args, out)
        print()
    if args.only in (None, "mix"):
        scale = args.hidden / VITA_WIDTH
        max_length = round(VITA_MAX_LENGTH * scale)
        llm = make_llm(os.path.join(out, "mix_llm"), args.hidden, args.layers, max_length)
        from transformers import AutoTokenizer

        words = one_token_words(AutoTokenizer.from_pretrained(llm))
        data, prompts = os.path.join(out, "mix.json"), os.path.join(out, "system_prompts.yaml")
        with open(data, "w") as fh:
            json.dump(mix_records(args.num_records, scale, words), fh)
        with open(prompts, "w") as fh:  # a few tokens: the template's fixed part, unlike the lengths, is not scaled
            fh.write("lang: Hi.\n")
        print(f"[mix] random Qwen2 LLM: width {args.hidden}, {args.layers} layers; VITA-1.5 lengths x {scale:.3f}; "
              f"media as text stand-ins (same token counts; no encoder runs); shares "
              + ", ".join(f"{kind} {share:.0%}" for share, kind, *_ in VITA_MIX), flush=True)
        compare("mix", ["--model_name_or_path", llm, "--data_path", data, "--model_max_length", str(max_length),
                        "--system_prompts", prompts,
                        "--learning_rate", "1e-4", *quiet], args, out)
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n(total wall time {time.time() - started:.0f}s; {os.cpu_count()} CPUs, 1-min load average at the end "
          f"{load:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
