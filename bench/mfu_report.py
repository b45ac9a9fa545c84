"""What bench/gpu_mfu.py prints: one run's throughput, FLOPs and MFU, and the side-by-side comparisons."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

from mfu_flops import FORMULA, model_flops, part_flops, stage3_parts
from mfu_run import REPO, Measurement

GIB = 2 ** 30


def peak_tflops(device_name: str) -> Optional[float]:
    """The bf16 dense peak for a device name (vitacore's table), or None when unknown."""
    from vitacore.model.flops import peak_flops

    peak = peak_flops(device_name)
    return None if peak is None else peak / 1e12


def fmt_flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.3f} {unit}"
    return f"{value:.0f} FLOP"


def fmt_gib(value: Optional[int]) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f} GiB"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}"


def mfu(m: Measurement, world_size: int, peak: Optional[float], recompute: bool = False) -> Optional[float]:
    """Model FLOPs (or, ``recompute``, with the recomputation) per second per GPU over the peak; None without one."""
    if m.oom or not peak:
        return None
    flops = m.flops if recompute else m.model_flops
    return m.per_s(flops) / world_size / (peak * 1e12)


def fmt_pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def describe_setup(m: Measurement, args, dist, device_name: str, say) -> None:
    """Device, precision, ZeRO stage, attention and the model's units (from the first measured variant)."""
    import torch
    import transformers

    info, t = m.info, m.info["config"].training
    deepspeed = os.path.relpath(t.deepspeed, REPO) if t.deepspeed.startswith(REPO) else t.deepspeed
    zero = info["ds_config"]["zero_optimization"]["stage"]
    say(f"device: {device_name} x {dist.world_size}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {'bf16' if t.bf16 else 'fp32'}, ZeRO-{zero} ({deepspeed}); LLM attention: "
        f"{info['attention']}; activation checkpointing on the LLM: {'on' if t.gradient_checkpointing else 'off'}")
    source = "given checkpoints" if args.model_name_or_path else "random"
    say(f"model ({source}; built in {info['build_seconds']:.0f}s, LLM born partitioned: {info['partitioned']}): "
        + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in info["units"].items())
        + f"; trains {', '.join(info['trained_units'])} ({info['trainable'] / 1e6:.1f}M parameters)")


def loss_path(m: Measurement, chunk: int) -> str:
    return f"chunked loss ({chunk} positions per chunk)" if m.chunked else "full logits (the LLM's own loss)"


def report_single(m: Measurement, args, dist, device_name: str, peak: Optional[float], say) -> None:
    """The fixed-length run: throughput, the FLOP breakdown of its one sample shape, MFU / HFU."""
    cuda = device_name != "CPU (--cpu_smoke)"
    say()
    describe_setup(m, args, dist, device_name, say)
    shapes = m.info["shapes"]
    samples_per_step = m.samples // m.steps
    seq = m.positions // m.samples
    say(f"batch: micro-batch {args.micro_batch} x accumulation {args.accumulation} x {dist.world_size} "
        f"{'GPU(s)' if cuda else 'process(es)'} = {samples_per_step} samples/step; each {args.text_tokens} text "
        f"tokens + 1 image ({shapes.image_tokens} tokens; the tower attends over {shapes.patches}) = {seq} LLM "
        f"positions; {loss_path(m, args.loss_chunk_size)}")
    say(f"steps: {args.warmup} warm-up + {m.steps} timed; mean {m.step_s * 1e3:.1f} ms/step, "
        f"median single step {m.median_s * 1e3:.1f} ms; final loss {m.final_loss:.4f} (random data)")
    say(f"throughput: {m.per_s(m.positions):,.0f} LLM tokens/s ({m.per_s(m.samples * args.text_tokens):,.0f} "
        f"text tokens/s, {m.per_s(m.supervised):,.0f} supervised), {m.per_s(m.samples):,.2f} samples/s")
    one = dataclasses.replace(shapes, text_tokens=args.text_tokens,
                              head_tokens=m.supervised // m.samples if m.chunked else None)
    parts = stage3_parts(one, checkpointing=m.info["config"].training.gradient_checkpointing)
    say("\nFLOPs per sample and step:")
    for part in parts:
        say(f"  {part.name:55s} {fmt_flops(part_flops(part)):>14s}  "
            f"(without recomputation {fmt_flops(model_flops(part))})")
    say(f"  {'total':55s} {fmt_flops(m.flops / m.samples):>14s}  "
        f"(without recomputation {fmt_flops(m.model_flops / m.samples)})")
    say(FORMULA)
    say(f"\nachieved per GPU: {m.per_s(m.model_flops) / dist.world_size / 1e12:.1f} TFLOP/s model FLOPs, "
        f"{m.per_s(m.flops) / dist.world_size / 1e12:.1f} TFLOP/s with the recomputation")
    if peak:
        say(f"peak: {peak:.0f} TFLOP/s bf16 dense ({'--peak_tflops' if args.peak_tflops else device_name})")
        say(f"MFU {fmt_pct(mfu(m, dist.world_size, peak))}   "
            f"(with recomputation, HFU: {fmt_pct(mfu(m, dist.world_size, peak, recompute=True))})")
    else:
        say("peak unknown for this device: achieved figures only (give --peak_tflops for an MFU)")
    rows = [r for r in m.info.get("rows", ()) if "tflops_per_s" in r]
    if rows:
        mfu_row = rows[-1].get("mfu")
        say(f"vitacore's own metrics row, for comparison (its own FLOP count, over all {args.warmup + m.steps} steps "
            f"with the warm-up): {rows[-1]['tflops_per_s'] / dist.world_size:.1f} TFLOP/s per GPU"
            + (f", mfu {100 * mfu_row:.1f} %" if mfu_row is not None else ""))
    if cuda:
        say(f"peak GPU memory allocated while training: {fmt_gib(m.peak_bytes)}")


def _memory_columns(m: Measurement) -> tuple[str, str]:
    growth = None if m.step_peak_bytes is None or m.before_bytes is None else m.step_peak_bytes - m.before_bytes
    return fmt_gib(m.peak_bytes), fmt_gib(growth)


def report_long(pairs: Sequence[tuple[int, Measurement, Measurement]], dist, say) -> None:
    """(a) full logits vs the chunked loss, per sequence length: step time and peak memory, and their ratios."""
    say("\n(a) full logits vs chunked loss: one sample per micro-batch (1 image + text, every answer token "
        "supervised), step time and peak GPU memory")
    say("    peak: the whole run's peak allocated (weights, optimizer states, activations); step: the timed "
        "steps' peak above what was allocated when they began")
    say(f"  {'positions':>9s}  {'path':8s} {'ms/step':>9s} {'tokens/s':>10s} {'peak':>11s} {'step':>11s}")
    for length, plain, chunked in pairs:
        for name, m in (("plain", plain), ("chunked", chunked)):
            if m.oom:
                say(f"  {length:>9,d}  {name:8s} CUDA out of memory ({m.oom})")
                continue
            peak, growth = _memory_columns(m)
            say(f"  {length:>9,d}  {name:8s} {m.step_s * 1e3:9.1f} {m.per_s(m.positions):10,.0f} {peak:>11s} "
                f"{growth:>11s}")
    for length, plain, chunked in pairs:
        if plain.oom and not chunked.oom:
            say(f"ratio chunked / plain at {length:,} positions: the plain path ran out of GPU memory; the chunked "
                f"one peaked at {fmt_gib(chunked.peak_bytes)}")
            continue
        if plain.oom or chunked.oom:
            say(f"ratio chunked / plain at {length:,} positions: n/a (out of memory)")
            continue
        steps_peak = [None if x.step_peak_bytes is None else x.step_peak_bytes - (x.before_bytes or 0)
                      for x in (chunked, plain)]
        say(f"ratio chunked / plain at {length:,} positions: step time {ratio(chunked.step_s, plain.step_s)}, "
            f"peak memory {ratio(chunked.peak_bytes, plain.peak_bytes)}, step memory "
            f"{ratio(*steps_peak)}")


def report_packing(padded: Measurement, packed: Measurement, args, dist, peak: Optional[float], say) -> None:
    """(b) padded vs packed on the VITA-like mix: supervised and position throughput, padding, MFU, ratios."""
    say(f"\n(b) padded vs packed on the VITA-like mix (rows of at most {args.packing_max_length:,} positions, "
        f"{loss_path(packed, args.loss_chunk_size)})")
    say(f"  {'side':7s} {'rows/mb':>7s} {'ms/step':>9s} {'samples':>8s} {'supervised/s':>13s} {'positions/s':>12s} "
        f"{'computed/s':>11s} {'padding':>8s} {'MFU':>7s} {'peak':>11s}")
    for m, rows in ((padded, args.micro_batch), (packed, args.packed_rows)):
        if m.oom:
            say(f"  {m.name:7s} CUDA out of memory ({m.oom})")
            continue
        padding = 1 - m.positions / m.computed
        say(f"  {m.name:7s} {rows:>7d} {m.step_s * 1e3:9.1f} {m.samples:>8d} {m.per_s(m.supervised):13,.0f} "
            f"{m.per_s(m.positions):12,.0f} {m.per_s(m.computed):11,.0f} {100 * padding:7.1f}% "
            f"{fmt_pct(mfu(m, dist.world_size, peak)):>7s} {fmt_gib(m.peak_bytes):>11s}")
    say("  supervised: answer tokens learned from; positions: the samples' LLM positions (images expanded); "
        "computed: rows x longest row, padding included; MFU counts each sample's own FLOPs (padding and the "
        "masked-out blocks of a packed row are not useful work)")
    for m in (padded, packed):
        if not m.oom:
            say(f"  {m.name}: {m.samples} samples in {m.steps} timed steps, mean {m.positions / m.samples:,.0f} "
                f"positions and {m.supervised / m.samples:,.0f} supervised tokens per sample; final loss "
                f"{m.final_loss:.4f} (random data)")
    if padded.oom or packed.oom:
        say("ratio packed / padded: n/a (out of memory)")
        return
    same = padded.info["timed_ids"] == packed.info["timed_ids"]
    say(f"  the timed steps of both sides read {'the same' if same else 'DIFFERENT'} "
        f"{len(packed.info['timed_ids'])} samples{'' if same else ' (the ratios compare different data)'}")
    def per_s(what: str) -> str:
        return ratio(packed.per_s(getattr(packed, what)), padded.per_s(getattr(padded, what)))

    say(f"ratio packed / padded: supervised tokens/s {per_s('supervised')}, positions/s {per_s('positions')}, "
        f"model FLOP/s (the MFU ratio) {per_s('model_flops')}")
