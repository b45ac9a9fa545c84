"""What keeping ranks in step costs: a text-only micro-batch step under 2-process ZeRO-3, with and without encoders.

Under ZeRO-3 with several processes, a micro-batch without images (audio) still runs the vision tower
(audio encoder) on a dummy input (``vitacore.model.encoder_sync``), since every rank must gather the same
parameters in the same order. Three sides train the same text-only batches, side by side in one run:
``llm`` (the LLM alone, a ``VitaModel`` without encoders); ``vitacore`` (the LLM with a SigLIP tower and
a Whisper encoder, handed to DeepSpeed as vitacore's Trainer hands it: frozen encoders and adapters held
out of ZeRO-3, ``--zero3_frozen_parts whole``; running vitacore's dummy passes); ``full-size`` (the same
model with every part partitioned, running the dummy passes as they were: one blank full-size image, one
silent clip padded to Whisper's 30 s window).

The models are random transformers ``Qwen2ForCausalLM``, ``SiglipVisionModel`` and ``WhisperEncoder``,
wrapped as vitacore wraps them, built partitioned under ZeRO-3 (``configs/zero3.json`` completed by
``vitacore.resolve_deepspeed_config``), scaled down with VITA-1.5's proportions (``SIZES`` in
``bench/text_only_sizes.py``, every width doubled by the default ``--width 2``) and the encoders' real
input geometry (384-pixel images in 14-pixel patches: 729 patches; Whisper's 3000 frames, 1500 states).
Stage 3 trains the LLM, projector and tower; stage 4 the LLM and projector; audio stays frozen;
activation checkpointing on the LLM, as in VITA's stages. Each step is timed around ``engine(...)``,
``engine.backward`` and ``engine.step``, and so are the dummy passes and DeepSpeed's parameter gathers
and gradient reduce-scatters (``fetch_sub_module``, the post-step re-gather of persistent parameters,
``__avg_scatter_grads``; waits included): the profile of the remainder. The sides take turns step by
step, in an order that rotates between rounds. An analytic FLOP count of the step at these sizes and at
VITA-1.5's real ones comes last.

    python bench/text_only_step.py            # relaunches itself: torchrun --nproc_per_node 2 (gloo, 1 thread each)
    python bench/text_only_step.py --stage 4  # the tower frozen too
    python bench/text_only_step.py --width 1  # half the widths: DeepSpeed's per-module costs weigh more
    python bench/text_only_step.py --quick    # tiny sizes, a few steps: checks the script runs
    python bench/text_only_step.py --param_persistence_threshold 0   # no parameter kept gathered between steps
    python bench/text_only_step.py --zero3_frozen_parts partitioned  # vitacore's side with frozen parts partitioned
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO3 = os.path.join(REPO, "configs", "zero3.json")

SIDES = ("llm", "vitacore", "full-size")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side and round (default 6; quick 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them, per side and round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds; each runs every side (default 5; quick 1)")
    parser.add_argument("--micro_batch", type=int, default=2, help="text-only samples per micro-batch and process")
    parser.add_argument("--text_tokens", type=int, default=256, help="tokens per sample")
    parser.add_argument("--stage", choices=("3", "4"), default="3",
                        help="3: LLM, projector and tower train; 4: LLM and projector (audio frozen in both)")
    parser.add_argument("--no_gradient_checkpointing", action="store_true", help="no activation checkpointing")
    parser.add_argument("--param_persistence_threshold", type=int, default=None,
                        help="stage3_param_persistence_threshold for both sides (default: the config's \"auto\", "
                             "10 x the LLM's hidden size); 0 keeps no parameter gathered between steps")
    parser.add_argument("--zero3_frozen_parts", choices=("whole", "partitioned"), default="whole",
                        help="the vitacore side's frozen encoders and adapters: whole on every rank (vitacore's "
                             "default) or ZeRO-3-partitioned (as before); the full-size side: partitioned")
    parser.add_argument("--width", type=int, default=None,
                        help="multiply every part's widths and head counts (not depths) by this: the same "
                             "proportions, more compute per step against DeepSpeed's per-module and per-tensor "
                             "costs (default 2: about 2 s per step; quick 1)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs (meaningless figures)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 6)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.width = args.width or (1 if args.quick else 2)
    if args.quick and args.text_tokens == 256:
        args.text_tokens = 32
    if min(args.steps, args.rounds, args.micro_batch, args.text_tokens, args.warmup, args.width) < 1:
        parser.error("--steps, --rounds, --micro_batch, --text_tokens, --warmup and --width must be >= 1")
    return args


def relaunch(argv: list[str]) -> int:
    """Run this script again under ``torchrun --standalone --nproc_per_node 2`` (CPU, gloo, one thread each)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.abspath(__file__), *argv]
    print("relaunching: DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 " + " ".join(command[1:]), flush=True)
    return subprocess.call(command, env=env)


# ---------------------------------------------------------------------------------------------------
# After this point the script runs in every process of the job.

import torch  # noqa: E402
from text_only_sizes import MEL_BINS, bench_sizes, print_flops  # noqa: E402

import vitacore  # noqa: E402
import vitacore.model.multimodal as multimodal  # noqa: E402
from vitacore.model import encoder_sync, module_for_engine  # noqa: E402


class Clock:
    """Seconds per named piece of the step, and the piece DeepSpeed's parameter fetches are charged to."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.piece_now = "forward"

    @contextlib.contextmanager
    def piece(self, name: str):
        outer, self.piece_now = self.piece_now, name
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.piece_now = outer


CLOCK = Clock()
# The dummy passes each side runs: vitacore's, or the full-size ones below.
DUMMIES = {"image": encoder_sync.dummy_image_output, "audio": encoder_sync.dummy_audio_output}


def full_size_image_output(model, device):
    """The dummy vision pass as it was: one blank image of the tower's full size, through tower and projector."""
    if not model.run_all_encoders or model.vision_tower is None or model.mm_projector is None:
        return None
    size = model.vision_tower.image_spec.image_size
    return sum(block.sum() for block in model.encode_images(torch.zeros(1, 3, size, size, device=device)))


def full_size_audio_output(model, device):
    """The dummy audio pass as it was: a 16-frame silent clip, which the Whisper encoder pads to its window."""
    if not model.run_all_encoders or model.audio_encoder is None or model.audio_adapter is None:
        return None
    clip, one = torch.zeros(1, 16, model.audio_encoder.num_mel_bins, device=device), torch.tensor([1], device=device)
    return sum(block.sum() for block in model.encode_audio(clip, one * 16, one))


def install_timers() -> None:
    """Route the model's dummy passes through :data:`DUMMIES` (timed), and time DeepSpeed's parameter gathers."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3


    def timed(kind: str, piece: str):
        def run(model, device):
            with CLOCK.piece(piece):
                return DUMMIES[kind](model, device)
        return run

    multimodal.dummy_image_output = timed("image", "dummy vision pass")
    multimodal.dummy_audio_output = timed("audio", "dummy audio pass")
    # Module fetches (forward, backward), the re-gather of every persistent parameter after each step, and
    # the gradient reduce-scatters (each bucket's, and the rest at the end of backward).
    for owner, method, kind in ((PartitionedParameterCoordinator, "fetch_sub_module", "gathers"),
                                (DeepSpeedZeroOptimizer_Stage3, "_post_step", "gathers"),
                                (DeepSpeedZeroOptimizer_Stage3, "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads",
                                 "reductions")):
        original = getattr(owner, method)

        def timed_method(self, *args, _original=original, _kind=kind, **kwargs):
            start = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                CLOCK.seconds[f"{_kind}: {CLOCK.piece_now}"] += time.perf_counter() - start

        setattr(owner, method, timed_method)


def build_side(args, sizes: dict, with_encoders: bool, dist, frozen_parts: str = "whole"):
    """A DeepSpeed ZeRO-3 engine over a random ``VitaModel`` (with or without encoders), built partitioned;
    ``frozen_parts``: ``--zero3_frozen_parts`` (frozen encoders and adapters made whole, or left partitioned)."""
    import deepspeed
    from transformers import (
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
        WhisperConfig,
        WhisperFeatureExtractor,
    )
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from vitacore.data.images import ImageSpec
    from vitacore.model.audio_adapters import AudioAdapter
    from vitacore.model.projector import build_projector
    from vitacore.model.vision import SIGLIP_MEAN, SIGLIP_STD, VisionTower
    from vitacore.model.whisper import WhisperAudioEncoder

    llm_sizes = sizes["llm"]
    ds_config, _ = vitacore.resolve_deepspeed_config(
        ZERO3, loop=vitacore.LoopConfig(per_device_train_batch_size=args.micro_batch),
        optim=vitacore.OptimConfig(), world_size=dist.world_size, hidden_size=llm_sizes["hidden_size"])
    if args.param_persistence_threshold is not None:
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = args.param_persistence_threshold
    torch.manual_seed(0)
    keep_alive = HfDeepSpeedConfig(ds_config)  # a weak global: held while the models are built, so they are partitioned
    try:
        llm = Qwen2ForCausalLM._from_config(Qwen2Config(**llm_sizes, max_position_embeddings=4096, use_cache=False),
                                            attn_implementation="sdpa")
        if with_encoders:
            tower_config = SiglipVisionConfig(**sizes["tower"])
            siglip = SiglipVisionModel._from_config(tower_config, attn_implementation="sdpa")
            whisper = WhisperEncoder._from_config(WhisperConfig(num_mel_bins=MEL_BINS, **sizes["whisper"]),
                                                  attn_implementation="sdpa")
    finally:
        del keep_alive
    parts = {}
    if with_encoders:
        tower = VisionTower(siglip, -2, False, ImageSpec(tower_config.image_size, SIGLIP_MEAN, SIGLIP_STD), "random")
        audio = WhisperAudioEncoder(whisper, WhisperFeatureExtractor(feature_size=MEL_BINS), source="random")
        hidden = llm.config.hidden_size
        parts = dict(vision_tower=tower, mm_projector=build_projector("mlp2x_gelu", tower.hidden_size, hidden),
                     audio_encoder=audio, audio_adapter=AudioAdapter(audio.hidden_size, hidden))
    model = vitacore.VitaModel(llm, model_max_length=args.text_tokens + 64, **parts)
    frozen = ("audio_encoder", "audio_adapter") + (("vision_tower",) if args.stage == "4" else ())
    for unit, module in model.unit_modules().items():
        module.requires_grad_(unit not in frozen)
    model.eval_units = frozen
    vitacore.prepare_for_training(model, not args.no_gradient_checkpointing, None, dist.world_size, dist.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    module = module_for_engine(model, ds_config, frozen_parts)
    engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config, dist_init_required=False,
                                           optimizer=torch.optim.AdamW(trainable, lr=1e-5))
    engine.train()
    return engine


def text_batches(args, vocab: int, count: int) -> list[dict]:
    """``count`` text-only micro-batches (every token supervised), the same for every side and round."""
    batches = []
    for index in range(count):
        g = torch.Generator().manual_seed(1000 * int(os.environ.get("RANK", "0")) + index)
        ids = torch.randint(0, vocab, (args.micro_batch, args.text_tokens), generator=g)
        batches.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return batches


def run_round(engines: dict, batches: list[dict], warmup: int, order: tuple) -> dict:
    """Train every side on ``batches``, one step of each side in turn (so a burst of load from elsewhere hits
    them alike); per side: the mean and median timed step, and the seconds of each piece per timed step."""
    durations = {side: [] for side in order}
    pieces = {side: defaultdict(float) for side in order}
    for index, batch in enumerate(batches):
        for side in order:
            full = side == "full-size"
            DUMMIES.update(image=full_size_image_output if full else encoder_sync.dummy_image_output,
                           audio=full_size_audio_output if full else encoder_sync.dummy_audio_output)
            engine = engines[side]
            CLOCK.seconds.clear()
            start = time.perf_counter()
            with CLOCK.piece("forward"):
                loss = engine(**batch)["loss"]
            with CLOCK.piece("backward"):
                engine.backward(loss)
            with CLOCK.piece("optimizer step"):
                engine.step()
            if index >= warmup:
                durations[side].append(time.perf_counter() - start)
                for name, seconds in CLOCK.seconds.items():
                    pieces[side][name] += seconds
    steps = len(batches) - warmup
    return {side: {"mean": sum(durations[side]) / steps, "median": statistics.median(durations[side]),
                   "pieces": {name: seconds / steps for name, seconds in pieces[side].items()}} for side in order}


PROFILE_ROWS = (
    ("forward", "forward"),
    ("  dummy vision pass", "dummy vision pass"),
    ("    of which parameter gathers", "gathers: dummy vision pass"),
    ("  dummy audio pass", "dummy audio pass"),
    ("    of which parameter gathers", "gathers: dummy audio pass"),
    ("  parameter gathers elsewhere", "gathers: forward"),
    ("backward", "backward"),
    ("  of which parameter gathers", "gathers: backward"),
    ("  of which gradient reduce-scatters", "reductions: backward"),
    ("optimizer step", "optimizer step"),
    ("  of which persistent-parameter gathers", "gathers: optimizer step"),
)


def print_profile(say, results: dict) -> None:
    """The per-piece table (ms per step, median over rounds) and the remainder vitacore - llm, by piece."""
    def piece(side, key):
        return statistics.median(r["pieces"].get(key, 0.0) for r in results[side]) * 1e3

    say(f"\n{'ms per timed step (median of rounds)':42s}" + "".join(f"{side:>12s}" for side in SIDES))
    for label, key in (("step (mean of the timed steps)", "mean"), ("step (median single step)", "median")):
        say(f"{label:42s}" + "".join(f"{statistics.median(r[key] for r in results[side]) * 1e3:12.1f}"
                                     for side in SIDES))
    for label, key in PROFILE_ROWS:
        say(f"{label:42s}" + "".join(f"{piece(side, key):12.1f}" for side in SIDES))
    for side in ("vitacore", "full-size"):
        extra = {name: piece(side, key) - piece("llm", key) for name, key in
                 (("forward", "forward"), ("backward", "backward"), ("step", "optimizer step"))}
        vision, audio = piece(side, "dummy vision pass"), piece(side, "dummy audio pass")
        say(f"remainder {side} - llm: {sum(extra.values()):.1f} ms/step = dummy vision pass {vision:.1f} + dummy "
            f"audio pass {audio:.1f} + rest of forward {extra['forward'] - vision - audio:.1f} + backward "
            f"{extra['backward']:.1f} + optimizer step {extra['step']:.1f}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if "LOCAL_RANK" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        return relaunch(argv)
    started = time.time()
    import transformers

    transformers.logging.set_verbosity_error()
    dist = vitacore.init_distributed()
    say = print if dist.is_main else (lambda *a, **k: None)
    if dist.world_size != 2:
        raise SystemExit(f"run with 2 processes (the job has {dist.world_size})")
    sizes = bench_sizes(args)
    install_timers()
    engines = {"llm": build_side(args, sizes, False, dist),
               "vitacore": build_side(args, sizes, True, dist, args.zero3_frozen_parts),
               "full-size": build_side(args, sizes, True, dist, "partitioned")}
    mm = engines["vitacore"].module
    mm = getattr(mm, "whole_model", mm)
    say(f"text-only micro-batch step, ZeRO-3 ({os.path.relpath(ZERO3, REPO)}), {dist.world_size} processes, "
        f"{torch.get_num_threads()} torch thread(s) each, fp32, stage {args.stage}, micro-batch {args.micro_batch} x "
        f"{args.text_tokens} tokens, widths x{args.width}, "
        f"activation checkpointing {'off' if args.no_gradient_checkpointing else 'on'}, "
        f"stage3_param_persistence_threshold "
        f"{engines['vitacore'].zero_param_persistence_threshold()}, --zero3_frozen_parts {args.zero3_frozen_parts} "
        f"(full-size: partitioned)")
    unit_counts = {unit: sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
                   for unit, module in mm.unit_modules().items()}
    say("parameters: " + ", ".join(f"{unit} {count:,}" for unit, count in unit_counts.items()))
    say(f"tower: {mm.vision_tower.encoder.config.image_size}px images, {mm.vision_tower.num_tokens_per_image} patches; "
        f"audio: Whisper window {mm.audio_encoder.window_frames} frames; each side: {args.warmup} warm-up + "
        f"{args.steps} timed steps per round, {args.rounds} round(s), the sides taking turns each step\n", flush=True)
    batches = text_batches(args, sizes["llm"]["vocab_size"], args.warmup + args.steps)
    results = {side: [] for side in SIDES}
    for round_index in range(args.rounds):
        order = SIDES[round_index % 3:] + SIDES[:round_index % 3]
        gc.collect()
        torch.distributed.barrier()
        for side, result in run_round(engines, batches, args.warmup, order).items():
            results[side].append(result)
        if not results["vitacore"][-1]["pieces"].get("dummy vision pass"):
            raise SystemExit("the model's dummy passes did not go through the timers; update install_timers")
        say(f"round {round_index + 1} (each step: {', '.join(order)}): " + "   ".join(
            f"{side} {results[side][-1]['mean'] * 1e3:8.1f} ms/step" for side in SIDES), flush=True)
    print_profile(say, results)
    print_flops(say, args)
    ratios = {}
    for side in ("vitacore", "full-size"):
        for key, what in (("mean", "mean step time"), ("median", "median single step")):
            ratios[side, key] = [a[key] / b[key] for a, b in zip(results[side], results["llm"])]
            say(f"per-round ratios {side}/llm ({what}): {', '.join(f'{r:.3f}' for r in ratios[side, key])}")
    say("note: models this small are partly overhead-bound (DeepSpeed's per-module ZeRO-3 hooks, gloo collectives); "
        "the analytic FLOPs above show what the dummy passes weigh at VITA-1.5's sizes.")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    say(f"(total wall time {time.time() - started:.0f}s; 1-min load average at the end {load:.1f})")
    say(f"ratio full-size dummies/llm step time (before): {statistics.median(ratios['full-size', 'mean']):.3f}")
    say(f"ratio vitacore/llm step time (text-only micro-batch, ZeRO-3, 2 processes): "
        f"{statistics.median(ratios['vitacore', 'mean']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
