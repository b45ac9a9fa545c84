"""Tokens/s and model FLOPs utilization (MFU) of a stage-3-like vitacore run on one CUDA GPU.

Builds a RANDOM Qwen2.5-0.5B-sized LLM (``Qwen2Config``: hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936, tied embeddings) and a RANDOM SigLIP-so400m-sized vision tower
(``SiglipVisionConfig``: hidden 1152, 27 layers, 16 heads, intermediate 4304, image 384, patch 14 -> 729
patches), composes them with ``vitacore.model.multimodal.VitaModel``, an ``mlp2x_gelu`` projector and
the small default audio encoder + adapter, and trains them the way stage 3 does: LLM, projector and
vision tower trainable (audio frozen), bf16, ZeRO-3 (the shipped ``configs/zero3.json`` completed by
``vitacore.resolve_deepspeed_config``), activation checkpointing on the LLM's decoder layers, the
chunked loss (``--loss_chunk_size``, 1024 as in the product; 0: the LLM's full logits), through
``vitacore.Trainer`` on synthetic batches. Nothing is downloaded or installed.

The models are built directly (no checkpoint on disk) while a ``transformers.integrations.HfDeepSpeedConfig``
is held alive, exactly as ``vitacore.build_model`` does it, so the LLM and the tower are born partitioned.
With ``--model_name_or_path``, ``--vision_tower`` and ``--audio_encoder`` (local folders) the script
instead goes through ``vitacore.recipes.build_model_from_config`` with those paths (the LLM folder needs
its tokenizer). Either way ``vitacore.prepare_for_training`` then sets the run-time switches a stage run
sets (activation checkpointing, TF32, the FLOP count of the metrics rows on GPUs).

Modes (each variant is a fresh model and Trainer; the GPU memory of one is released before the next):

* default: fixed-length samples (micro-batch 4, each 1024 text tokens + 1 image of 729 tokens = 1753
  LLM positions): tokens/s, samples/s, the FLOP breakdown, achieved TFLOP/s per GPU and MFU / HFU.
* ``--packing``: a seeded VITA-like length mix (many short text and one-image samples, a few 4-8-frame
  videos; bench/mfu_data.py), padded (``--micro_batch`` samples per micro-batch, each row padded to the
  longest) vs packed (``--packed_rows`` rows of at most ``--packing_max_length`` positions, images
  expanded, ``segment_ids`` per sample), side by side on the same timed pool of samples (the padded
  side's ``--steps`` steps read it once; the packed side takes as many steps as its packs need):
  supervised tokens/s, position tokens/s, the padding computed, MFU, and the ratios packed / padded.
* ``--compare``: in one run, (a) full logits vs the chunked loss at ``--long_lengths`` positions (one
  sample per micro-batch): step time and peak GPU memory, a CUDA out-of-memory of either path reported
  as such; then (b) the ``--packing`` comparison; the ratios of both.

Each variant times its optimizer steps (``--steps``; the long-sequence pairs ``--long_steps``) after
untimed ones (``--warmup``; the long-sequence pairs one), the clock stamped after a CUDA synchronize
when DeepSpeed finishes each optimizer update. Positions, supervised tokens and FLOPs are those of
exactly the timed micro-batches (read from their sample ids). The FLOP count is bench/mfu_flops.py
(pure Python, unit-tested on CPU); MFU uses a small table of bf16 dense peaks.

    python bench/gpu_mfu.py                          # one GPU; well under 5 minutes on an H100/H200
    python bench/gpu_mfu.py --micro_batch 8 --steps 30
    python bench/gpu_mfu.py --packing                # padded vs packed on the VITA-like mix
    python bench/gpu_mfu.py --compare                # full logits vs chunked at 16k/32k, then padded vs packed
    python bench/gpu_mfu.py --loss_chunk_size 0      # the LLM's full logits instead of the chunked loss
    python bench/gpu_mfu.py --cpu_smoke [--packing | --compare]   # no GPU: tiny sizes on CPU, plumbing only

Without a CUDA GPU (and without ``--cpu_smoke``) it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ holds the mfu_* modules
from mfu_data import draw_mix, fixed_workload, mix_workload, plan_mix  # noqa: E402
from mfu_models import FULL, TINY, image_tokens_of  # noqa: E402
from mfu_report import describe_setup, peak_tflops, report_long, report_packing, report_single  # noqa: E402
from mfu_run import ZERO3, StepClock, Variant, run_variant  # noqa: E402

SMOKE_TEXT_SCALE = 1 / 16  # --cpu_smoke: the mix's text lengths shrink with its 16-token images


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro_batch", type=int, default=4,
                        help="per-GPU micro-batch in samples (--packing: of the padded side)")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--text_tokens", type=int, default=1024, help="text tokens per sample (plus one image)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--loss_chunk_size", type=int, default=1024,
                        help="positions per chunk of the chunked output head + loss (0: the LLM's full logits)")
    parser.add_argument("--packing", action="store_true",
                        help="padded vs packed rows on a VITA-like length mix, side by side")
    parser.add_argument("--packing_max_length", type=int, default=None,
                        help="most positions of a packed row, images expanded (default 8192; --cpu_smoke 256)")
    parser.add_argument("--packed_rows", type=int, default=0,
                        help="packed rows per micro-batch (0: as many as hold about --micro_batch mean samples)")
    parser.add_argument("--compare", action="store_true",
                        help="full logits vs chunked loss at --long_lengths, then padded vs packed, in one run")
    parser.add_argument("--long_lengths", default=None,
                        help="--compare: comma-separated LLM positions per sample (default 16384,32768; "
                             "--cpu_smoke 256)")
    parser.add_argument("--long_steps", type=int, default=3, help="--compare: timed steps per long-sequence run")
    parser.add_argument("--no_gradient_checkpointing", action="store_true",
                        help="turn activation checkpointing off (on by default, as in VITA's stage 3)")
    parser.add_argument("--deepspeed", default=ZERO3, help="DeepSpeed JSON (default: the shipped configs/zero3.json)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="bf16 dense peak per GPU, for a device the built-in table does not know")
    parser.add_argument("--model_name_or_path", default=None, help="a local LLM folder instead of the random one")
    parser.add_argument("--vision_tower", default=None, help="a local vision tower folder instead of the random one")
    parser.add_argument("--audio_encoder", default=None, help="a vitacore audio encoder folder")
    parser.add_argument("--cpu_smoke", action="store_true",
                        help="no GPU needed: tiny sizes, fp32, CPU; checks the script runs (figures mean nothing)")
    args = parser.parse_args(argv)
    if min(args.micro_batch, args.accumulation, args.text_tokens, args.warmup, args.steps, args.long_steps) < 1:
        parser.error("--micro_batch, --accumulation, --text_tokens, --warmup, --steps and --long_steps must be >= 1")
    if args.loss_chunk_size < 0 or args.packed_rows < 0:
        parser.error("--loss_chunk_size and --packed_rows must be >= 0")
    paths = (args.model_name_or_path, args.vision_tower)
    if any(paths) and not all(paths):
        parser.error("give both --model_name_or_path and --vision_tower, or neither (random models)")
    if args.cpu_smoke and args.text_tokens == 1024:
        args.text_tokens = 32
    if args.packing_max_length is None:
        args.packing_max_length = 256 if args.cpu_smoke else 8192
    if args.long_lengths is None:
        args.long_lengths = "256" if args.cpu_smoke else "16384,32768"
    try:
        args.long_lengths = [int(x) for x in args.long_lengths.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--long_lengths {args.long_lengths!r}: give comma-separated integers, e.g. 16384,32768")
    if args.packing_max_length < 2 or not args.long_lengths:
        parser.error("--packing_max_length must be >= 2 and --long_lengths must name a length")
    return args


def packed_rows_for(args, image_tokens: int, seed: int) -> int:
    """Rows per packed micro-batch that hold about ``--micro_batch`` samples of the mix's mean length."""
    specs = draw_mix(4096, seed, SMOKE_TEXT_SCALE if args.cpu_smoke else 1.0, image_tokens, args.packing_max_length)
    mean = sum(spec.stats(image_tokens).positions for spec in specs) / len(specs)
    return max(1, round(args.micro_batch * mean / args.packing_max_length))


def compare_long(args, dist, clock, sizes, image_tokens: int, say):
    """(a): per length, the chunked loss then full logits, each a fresh run of one sample per micro-batch."""
    chunk = args.loss_chunk_size or 1024
    pairs = []
    for length in args.long_lengths:
        if length <= image_tokens + 1:
            raise SystemExit(f"--long_lengths {length} must exceed one image's {image_tokens} positions + 1")
        runs = {}
        for name, chunk_size in (("chunked", chunk), ("plain", 0)):
            count = args.accumulation * (1 + args.long_steps)
            variant = Variant(f"{name} {length}", length, 1, chunk_size,
                              fixed_workload(count, length - image_tokens, args.seed), 1, args.long_steps)
            runs[name] = run_variant(args, variant, dist, clock, sizes, say)
        pairs.append((length, runs["plain"], runs["chunked"]))
    return pairs


def compare_packing(args, dist, clock, sizes, image_tokens: int, say):
    """(b): the mix padded, then packed, each a fresh run; both time the same pool of samples, once.

    The padded side's ``--steps`` timed steps read the pool (``--steps`` x micro-batch x accumulation x
    GPUs samples); the packed side packs that pool and takes as many steps as its packs need.
    """
    if not args.packed_rows:
        args.packed_rows = packed_rows_for(args, image_tokens, args.seed)
    per_step = args.accumulation * dist.world_size  # micro-batches per optimizer step, over all GPUs
    plan = plan_mix(args.steps * args.micro_batch * per_step, args.warmup * args.micro_batch * per_step,
                    args.warmup * args.packed_rows * per_step, SMOKE_TEXT_SCALE if args.cpu_smoke else 1.0,
                    image_tokens, args.packing_max_length, args.seed)
    packed_steps = math.ceil(plan.num_timed_packs / (args.packed_rows * per_step))
    padded = Variant("padded", args.packing_max_length, args.micro_batch, args.loss_chunk_size,
                     mix_workload(plan, False, args.seed), args.warmup, args.steps)
    packed = Variant("packed", args.packing_max_length, args.packed_rows, args.loss_chunk_size,
                     mix_workload(plan, True, args.seed), args.warmup, packed_steps)
    return [run_variant(args, v, dist, clock, sizes, say) for v in (padded, packed)]


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("bench/gpu_mfu.py needs a CUDA GPU (torch.cuda.is_available() is False here); nothing was run.\n"
              "Run it on a machine with an NVIDIA GPU, or add --cpu_smoke to check the script on CPU with "
              "tiny sizes (its figures mean nothing).", file=sys.stderr)
        return 2
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    started = time.time()
    import transformers

    import vitacore

    transformers.logging.set_verbosity_error()
    dist = vitacore.init_distributed()
    say = print if dist.is_main else (lambda *a, **k: None)
    if args.model_name_or_path:
        vitacore.enable_console()  # vitacore's lines about the given checkpoints (model type, loading), rank 0
    sizes = TINY if args.cpu_smoke else FULL
    if args.model_name_or_path:
        tower_config = transformers.AutoConfig.from_pretrained(args.vision_tower)
        tower_config = getattr(tower_config, "vision_config", tower_config)
        image_tokens = (tower_config.image_size // tower_config.patch_size) ** 2
    else:
        image_tokens = image_tokens_of(sizes)
    args.seed = vitacore.RunConfig().training.seed
    clock = StepClock(cuda)
    device_name = torch.cuda.get_device_name() if cuda else "CPU (--cpu_smoke)"
    peak = args.peak_tflops or (peak_tflops(device_name) if cuda else None)
    what = ("the given checkpoints" if args.model_name_or_path else "random models (tiny --cpu_smoke sizes)"
            if args.cpu_smoke else "random models (Qwen2.5-0.5B-sized LLM, SigLIP-so400m-sized tower)")
    say(f"{what}; {'--compare' if args.compare else '--packing' if args.packing else 'fixed-length samples'}",
        flush=True)

    if args.compare or args.packing:
        pairs = compare_long(args, dist, clock, sizes, image_tokens, say) if args.compare else []
        padded, packed = compare_packing(args, dist, clock, sizes, image_tokens, say)
        measured = [m for _, *both in pairs for m in both] + [padded, packed]
        say()
        describe_setup(next(m for m in measured if "units" in m.info), args, dist, device_name, say)
        if peak:
            say(f"peak: {peak:.0f} TFLOP/s bf16 dense ({'--peak_tflops' if args.peak_tflops else device_name})")
        if pairs:
            report_long(pairs, dist, say)
        report_packing(padded, packed, args, dist, peak, say)
        if cuda:
            left = max(m.info.get("left_allocated", 0) for m in measured)
            say(f"GPU memory still allocated after releasing a variant (at most): {left / 2**30:.2f} GiB")
    else:
        samples_per_step = args.micro_batch * args.accumulation * dist.world_size
        variant = Variant("fixed", args.text_tokens + image_tokens, args.micro_batch, args.loss_chunk_size,
                          fixed_workload(samples_per_step * (args.warmup + args.steps), args.text_tokens, args.seed),
                          args.warmup, args.steps)
        measurement = run_variant(args, variant, dist, clock, sizes, say)
        if measurement.oom:
            say(f"CUDA out of memory: {measurement.oom}; lower --micro_batch or --text_tokens")
            return 1
        report_single(measurement, args, dist, device_name, peak, say)
    if args.cpu_smoke:
        say("note: --cpu_smoke ran tiny models on CPU in fp32 to check the script; its figures mean nothing.")
    say(f"(total wall time {time.time() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
