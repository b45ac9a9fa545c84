"""Tokens/s and model FLOPs utilization (MFU) of a stage-3-like vitacore run on one CUDA GPU.

Builds a RANDOM Qwen2.5-0.5B-sized LLM (``Qwen2Config``: hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936, tied embeddings) and a RANDOM SigLIP-so400m-sized vision tower
(``SiglipVisionConfig``: hidden 1152, 27 layers, 16 heads, intermediate 4304, image 384, patch 14 -> 729
patches), composes them with ``vitacore.model.multimodal.VitaModel``, an ``mlp2x_gelu`` projector and
the small default audio encoder + adapter, and trains them the way stage 3 does: LLM, projector and
vision tower trainable (audio frozen), bf16, ZeRO-3 (the shipped ``configs/zero3.json`` completed by
``vitacore.resolve_deepspeed_config``), activation checkpointing on the LLM's decoder layers, through
``vitacore.Trainer`` on synthetic batches (default: micro-batch 4, each sample 1024 text tokens + 1
image of 729 tokens = 1753 LLM positions). Nothing is downloaded or installed.

The models are built directly (no checkpoint on disk) while a ``transformers.integrations.HfDeepSpeedConfig``
is held alive, exactly as ``vitacore.build_model`` does it, so the LLM and the tower are born partitioned.
With ``--model_name_or_path``, ``--vision_tower`` and ``--audio_encoder`` (local folders) the script
instead goes through ``vitacore.recipes.build_model_from_config`` with those paths (the LLM folder needs
its tokenizer). Either way ``vitacore.prepare_for_training`` then sets the run-time switches a stage run
sets (activation checkpointing, TF32, the FLOP count of the metrics rows on GPUs).

It times ``--steps`` optimizer steps after ``--warmup`` untimed ones (clock stamped, after a CUDA
synchronize, when DeepSpeed finishes each optimizer update) and prints tokens/s, samples/s, the
achieved TFLOP/s per GPU and the MFU against a small table of bf16 dense peaks. The FLOP count is
:func:`training_flops` (importable, pure Python, unit-tested on CPU); the formula is printed.

    python bench/gpu_mfu.py                          # one GPU; well under 5 minutes on an H100/H200
    python bench/gpu_mfu.py --micro_batch 8 --steps 30
    python bench/gpu_mfu.py --cpu_smoke              # no GPU: tiny sizes on CPU, checks the plumbing only

Without a CUDA GPU (and without ``--cpu_smoke``) it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO3 = os.path.join(REPO, "configs", "zero3.json")

def peak_tflops(device_name: str) -> Optional[float]:
    """The bf16 dense peak for a device name (vitacore's table), or None when unknown."""
    from vitacore.model.flops import peak_flops

    peak = peak_flops(device_name)
    return None if peak is None else peak / 1e12


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ holds mfu_flops.py
from mfu_flops import FORMULA, Shapes, model_flops, part_flops, stage3_parts, training_flops  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# The run (CUDA; or --cpu_smoke).

@dataclass(frozen=True)
class Sizes:
    llm: dict
    tower: dict


FULL = Sizes(
    llm=dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
             intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
             tie_word_embeddings=True, hidden_act="silu"),
    tower=dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304,
               image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
)
TINY = Sizes(
    llm=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=1000, max_position_embeddings=4096, rms_norm_eps=1e-6,
             tie_word_embeddings=True, hidden_act="silu"),
    tower=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128,
               image_size=32, patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro_batch", type=int, default=4, help="per-GPU micro-batch (samples)")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--text_tokens", type=int, default=1024, help="text tokens per sample (plus one image)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
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
    if min(args.micro_batch, args.accumulation, args.text_tokens, args.warmup, args.steps) < 1:
        parser.error("--micro_batch, --accumulation, --text_tokens, --warmup and --steps must be >= 1")
    paths = (args.model_name_or_path, args.vision_tower)
    if any(paths) and not all(paths):
        parser.error("give both --model_name_or_path and --vision_tower, or neither (random models)")
    if args.cpu_smoke and args.text_tokens == 1024:
        args.text_tokens = 32
    return args


def make_config(args, seq_len: int):
    """Stage 3's preset (LLM + projector + tower train, audio frozen) with this run's sizes."""
    import vitacore

    config = vitacore.RunConfig()
    config.stage = "3"
    if args.model_name_or_path:
        config.set("model_name_or_path", args.model_name_or_path, "flag")
        config.set("vision_tower", args.vision_tower, "flag")
        if args.audio_encoder:
            config.set("audio_encoder", args.audio_encoder, "flag")
    # VITA's stage-3 values (not the embedded demo's), even for the random models; a resolved copy.
    _, config = vitacore.resolve_stage(config, embedded_default=False)
    t = config.training
    t.output_dir = tempfile.mkdtemp(prefix="vitacore-gpu-mfu-")
    t.deepspeed = args.deepspeed
    t.bf16 = not args.cpu_smoke
    t.per_device_train_batch_size = args.micro_batch
    t.gradient_accumulation_steps = args.accumulation
    t.max_steps = args.warmup + args.steps
    t.model_max_length = seq_len
    t.gradient_checkpointing = not args.no_gradient_checkpointing
    t.logging_steps = 10**9
    t.save_strategy = "no"
    t.eval_strategy = "no"
    t.report_to = "none"
    vitacore.validate(config)
    return config


def build_random(config, sizes: Sizes, ds_config: dict):
    """LLM + tower built partitioned under ZeRO-3 (as ``vitacore.build_model`` does), plus the rest."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, SiglipVisionConfig, SiglipVisionModel
    from transformers.integrations import HfDeepSpeedConfig

    from vitacore.data.images import ImageSpec
    from vitacore.model.audio import AudioAdapter, AudioEncoder, AudioEncoderConfig
    from vitacore.model.multimodal import VitaModel
    from vitacore.model.projector import build_projector
    from vitacore.model.vision import SIGLIP_MEAN, SIGLIP_STD, VisionTower
    from vitacore.recipes import compute_dtype

    dtype = compute_dtype(config)
    torch.manual_seed(config.training.seed)
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    # A weak global: it must stay referenced for the whole construction, or the models load unpartitioned.
    keep_alive = HfDeepSpeedConfig(ds_config) if zero3 else None
    try:
        llm = AutoModelForCausalLM.from_config(Qwen2Config(**sizes.llm), dtype=dtype, attn_implementation="sdpa")
        encoder = SiglipVisionModel._from_config(SiglipVisionConfig(**sizes.tower), dtype=dtype,
                                                 attn_implementation="sdpa")
    finally:
        del keep_alive
    llm.config.use_cache = False
    spec = ImageSpec(sizes.tower["image_size"], SIGLIP_MEAN, SIGLIP_STD)
    tower = VisionTower(encoder, select_layer=-2, drop_cls=False, image_spec=spec, source="random")
    hidden = llm.config.hidden_size
    projector = build_projector(config.model.mm_projector_type, tower.hidden_size, hidden).to(dtype)
    audio_encoder = AudioEncoder(AudioEncoderConfig()).to(dtype)
    audio_adapter = AudioAdapter(audio_encoder.hidden_size, hidden).to(dtype)
    mm_config = {"mm_vision_tower": "random", "mm_projector_type": config.model.mm_projector_type,
                 "mm_hidden_size": tower.hidden_size}
    return VitaModel(llm, tower, projector, audio_encoder, audio_adapter, None, None,
                     model_max_length=config.training.model_max_length, padding_side="right", mm_config=mm_config)


def shapes_of(model, text_tokens: int) -> Shapes:
    """The FLOP-relevant shapes of a built ``VitaModel`` (Llama/Qwen2-style LLM, SigLIP/CLIP-style tower)."""
    lc = model.llm.config
    tower = model.vision_tower
    vc = tower.encoder.config
    heads = lc.num_attention_heads
    patches = (vc.image_size // vc.patch_size) ** 2
    return Shapes(
        llm_hidden=lc.hidden_size, llm_layers=lc.num_hidden_layers, llm_heads=heads,
        llm_kv_heads=getattr(lc, "num_key_value_heads", None) or heads,
        llm_head_dim=getattr(lc, "head_dim", None) or lc.hidden_size // heads,
        llm_intermediate=lc.intermediate_size, vocab=lc.vocab_size,
        tower_hidden=vc.hidden_size, tower_layers=vc.num_hidden_layers, tower_intermediate=vc.intermediate_size,
        patch_size=vc.patch_size, channels=getattr(vc, "num_channels", 3),
        patches=patches + (1 if tower.drop_cls else 0), image_tokens=tower.num_tokens_per_image,
        tower_head=bool(getattr(vc, "vision_use_head", False)) and vc.model_type.startswith("siglip"),
        select_layer=tower.select_layer, text_tokens=text_tokens)


class SyntheticSamples:
    """Fixed-length random samples: ``<bos-like token> <image> text...``, every text token supervised.

    Images come from a small pool made once, so the loader's cost stays negligible next to a step.
    """

    def __init__(self, count: int, text_tokens: int, vocab: int, image_size: int, seed: int):
        import torch

        from vitacore.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

        g = torch.Generator().manual_seed(seed)
        self.count, self.text_tokens, self.vocab, self.seed = count, text_tokens, vocab, seed
        self.images = torch.rand(8, 3, image_size, image_size, generator=g) * 2 - 1
        self.image_id, self.ignore = IMAGE_TOKEN_INDEX, IGNORE_INDEX

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        import torch

        g = torch.Generator().manual_seed(self.seed + 1 + index)
        ids = torch.randint(0, self.vocab, (self.text_tokens + 1,), generator=g)
        ids[1] = self.image_id
        labels = ids.clone()
        labels[:2] = self.ignore
        return {"input_ids": ids, "labels": labels, "image": self.images[index % len(self.images)],
                "sample_id": f"synthetic-{index}"}


def collate(samples: list[dict]) -> dict:
    import torch

    input_ids = torch.stack([s["input_ids"] for s in samples])
    return {"input_ids": input_ids, "labels": torch.stack([s["labels"] for s in samples]),
            "attention_mask": torch.ones_like(input_ids), "images": torch.stack([s["image"] for s in samples]),
            "sample_ids": [s["sample_id"] for s in samples]}


def install_step_stamp(stamps: list[float], cuda: bool) -> None:
    """Stamp the clock (after a CUDA synchronize) whenever DeepSpeed finishes an optimizer update."""
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._take_model_step

    def stamped(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return result

    DeepSpeedEngine._take_model_step = stamped


def fmt_flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.3f} {unit}"
    return f"{value:.0f} FLOP"


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
    from vitacore.recipes import build_model_from_config, plan_model
    from vitacore.recipes.specs import loop_config, optim_config

    transformers.logging.set_verbosity_error()
    dist = vitacore.init_distributed()
    say = print if dist.is_main else (lambda *a, **k: None)
    sizes = TINY if args.cpu_smoke else FULL
    if args.model_name_or_path:
        tower_config = transformers.AutoConfig.from_pretrained(args.vision_tower)
        tower_config = getattr(tower_config, "vision_config", tower_config)
        image_tokens = (tower_config.image_size // tower_config.patch_size) ** 2
    else:
        image_tokens = (sizes.tower["image_size"] // sizes.tower["patch_size"]) ** 2
    seq_len = args.text_tokens + image_tokens
    config = make_config(args, seq_len)
    if args.model_name_or_path:
        plan = plan_model(config, with_data=False)  # the LLM's size and family from its config, no weights
        config, hidden = plan.config, plan.hidden_size
    else:
        hidden = sizes.llm["hidden_size"]
    t = config.training
    loop, optim = loop_config(config), optim_config(config)  # the Trainer's typed configs, as a stage run derives them
    ds_config, _ = vitacore.resolve_deepspeed_config(t.deepspeed, loop=loop, optim=optim, world_size=dist.world_size,
                                                     hidden_size=hidden, bf16=t.bf16, fp16=t.fp16)

    what = ("the given checkpoints" if args.model_name_or_path else "random models (tiny --cpu_smoke sizes)"
            if args.cpu_smoke else "random models (Qwen2.5-0.5B-sized LLM, SigLIP-so400m-sized tower)")
    say(f"building {what} ...", flush=True)
    build_started = time.time()
    if args.model_name_or_path:
        vitacore.enable_console()  # vitacore's lines about the given checkpoints (model type, loading), rank 0
        bundle, config = build_model_from_config(config, deepspeed_config=ds_config)
        model = bundle.model
    else:
        model = build_random(config, sizes, ds_config)
    build_seconds = time.time() - build_started
    # What the Trainer used to switch on itself, as a stage run does it: activation checkpointing on the LLM,
    # TF32, dummy encoder passes with several processes, and (on GPUs) the FLOP count of the metrics rows.
    vitacore.prepare_for_training(model, t.gradient_checkpointing, t.tf32, dist.world_size, dist.device)
    shapes = shapes_of(model, args.text_tokens)
    seq = shapes.text_tokens + shapes.image_tokens
    if seq > t.model_max_length:
        raise SystemExit(f"{seq} LLM positions per sample exceed model_max_length {t.model_max_length}")
    partitioned = all(hasattr(p, "ds_id") for p in model.llm.parameters())

    policy = vitacore.policy_from_config(config)
    policy.apply(model, vitacore.UNIT_PREFIXES)
    groups = vitacore.param_groups_for_run(model, vitacore.UNIT_PREFIXES, optim)

    def numel(p):
        return getattr(p, "ds_numel", p.numel())

    units = {name: sum(numel(p) for p in module.parameters()) for name, module in model.unit_modules().items()}
    trainable = sum(numel(p) for g in groups for p in g["params"])

    samples_per_step = args.micro_batch * args.accumulation * dist.world_size
    total_steps = args.warmup + args.steps
    dataset = SyntheticSamples(samples_per_step * total_steps, args.text_tokens, shapes.vocab,
                               model.vision_tower.image_spec.image_size, t.seed)
    checkpointer = vitacore.Checkpointer(
        vitacore.CheckpointConfig(t.output_dir, t.save_total_limit, t.resume_from_checkpoint), dist)
    trainer = vitacore.Trainer(model, groups, dataset, collate, dist, loop=loop, optim=optim,
                               deepspeed_config=ds_config, checkpointer=checkpointer)
    stamps: list[float] = []
    install_step_stamp(stamps, cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = trainer.fit()
    if len(stamps) < total_steps:
        raise SystemExit(f"expected {total_steps} optimizer steps, saw {len(stamps)}")
    timed = stamps[args.warmup - 1:total_steps]
    durations = [b - a for a, b in zip(timed, timed[1:])]
    step_s = (timed[-1] - timed[0]) / args.steps
    median_s = statistics.median(durations)

    parts = stage3_parts(shapes, checkpointing=t.gradient_checkpointing)
    hardware = training_flops(parts, samples_per_step, recompute=True)
    model_only = training_flops(parts, samples_per_step, recompute=False)
    per_gpu_hw = hardware / step_s / dist.world_size
    per_gpu_model = model_only / step_s / dist.world_size
    device_name = torch.cuda.get_device_name() if cuda else "CPU (--cpu_smoke)"
    peak = args.peak_tflops or (peak_tflops(device_name) if cuda else None)

    say()
    say(f"device: {device_name} x {dist.world_size}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; "
        f"{'bf16' if t.bf16 else 'fp32'}, ZeRO-{ds_config['zero_optimization']['stage']} "
        f"({os.path.relpath(t.deepspeed, REPO) if t.deepspeed.startswith(REPO) else t.deepspeed}); "
        f"activation checkpointing on the LLM: {'on' if t.gradient_checkpointing else 'off'}")
    say(f"model ({'given checkpoints' if args.model_name_or_path else 'random'}; built in {build_seconds:.0f}s, "
        f"LLM born partitioned: {partitioned}): " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in units.items())
        + f"; trains {', '.join(policy.trained_units())} ({trainable / 1e6:.1f}M parameters)")
    say(f"batch: micro-batch {args.micro_batch} x accumulation {args.accumulation} x {dist.world_size} "
        f"{'GPU(s)' if cuda else 'process(es)'} = "
        f"{samples_per_step} samples/step; each {shapes.text_tokens} text tokens + 1 image "
        f"({shapes.image_tokens} tokens; the tower attends over {shapes.patches}) = {seq} LLM positions")
    say(f"steps: {args.warmup} warm-up + {args.steps} timed; mean {step_s * 1e3:.1f} ms/step, "
        f"median single step {median_s * 1e3:.1f} ms; final loss {result.last_loss:.4f} (random data)")
    say(f"throughput: {samples_per_step * seq / step_s:,.0f} LLM tokens/s "
        f"({samples_per_step * shapes.text_tokens / step_s:,.0f} text tokens/s), "
        f"{samples_per_step / step_s:,.2f} samples/s")
    say("\nFLOPs per sample and step:")
    for part in parts:
        say(f"  {part.name:55s} {fmt_flops(part_flops(part)):>14s}  "
            f"(without recomputation {fmt_flops(model_flops(part))})")
    say(f"  {'total':55s} {fmt_flops(hardware / samples_per_step):>14s}  "
        f"(without recomputation {fmt_flops(model_only / samples_per_step)})")
    say(FORMULA)
    say(f"\nachieved per GPU: {per_gpu_model / 1e12:.1f} TFLOP/s model FLOPs, "
        f"{per_gpu_hw / 1e12:.1f} TFLOP/s with the recomputation")
    if peak:
        say(f"peak: {peak:.0f} TFLOP/s bf16 dense ({'--peak_tflops' if args.peak_tflops else device_name})")
        say(f"MFU {100 * per_gpu_model / (peak * 1e12):.1f} %   "
            f"(with recomputation, HFU: {100 * per_gpu_hw / (peak * 1e12):.1f} %)")
    else:
        say("peak unknown for this device: achieved figures only (give --peak_tflops for an MFU)")
    rows = [r for r in result.rows if "tflops_per_s" in r]
    if rows:
        mfu_row = rows[-1].get("mfu")
        say(f"vitacore's own metrics row, for comparison (its own FLOP count, over all {total_steps} steps with the "
            f"warm-up): {rows[-1]['tflops_per_s'] / dist.world_size:.1f} TFLOP/s per GPU"
            + (f", mfu {100 * mfu_row:.1f} %" if mfu_row is not None else ""))
    if cuda:
        say(f"peak GPU memory allocated while training: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.cpu_smoke:
        say("note: --cpu_smoke ran tiny models on CPU in fp32 to check the script; its figures mean nothing.")
    say(f"(total wall time {time.time() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
