"""Peak memory of one training step at long sequences: the chunked loss vs the LLM's full logits.

One forward and backward of a ``VitaModel`` around a narrow random Qwen2 LLM with Qwen2.5's
151,936-token vocabulary (untied output head, text only, batch 1, float32, CPU), at each length of
``--lengths``, on two label layouts: ``all`` (every token supervised, the worst case for both paths)
and ``vita`` (turns of 512 tokens whose last 128 are the supervised answer: 25 %). Paths:
``plain`` (``loss_chunk_size`` 0: full logits and a float32 cross-entropy over them) and
``chunked`` (``loss_chunk_size`` ``--chunk``). The step is what the Trainer runs: the forward, the
output dict dropped but the loss, then ``backward``; gradients land in ``.grad``.

Memory is measured two ways:

  (a) ``tracker``: bytes of live tensor storage counted at every aten op (``bench/tensor_memory.py``),
      run on *fake* tensors (shapes and dtypes, no data, no memory), so every length and path is
      measured, including plain steps far larger than this machine's RAM;
  (b) ``rss``: where the fake peak fits ``--real_limit_gib`` (and half the available memory), the
      same step on real tensors in a fresh process: the process's peak resident memory over the step
      (``/proc/self/status`` VmHWM, reset just before the step) minus its resident memory before it.
      That process also runs the tracker on its real tensors. It runs with ``MALLOC_MMAP_THRESHOLD_``
      set, so freed tensors go back to the OS at once and resident memory follows live tensors rather
      than malloc's heap. A short warm-up step (then gradients set to None) comes first, so thread
      pools and kernels' one-off buffers are not counted.

"peak" is the step's peak of live tensor bytes, parameters, inputs, activations, gradients and
the loss's tensors included; "growth" is that peak minus what was live before the step (parameters
and inputs), the figure comparable with resident-memory growth. Ratios are chunked / plain.

    python bench/long_context.py [--lengths 4096,8192,16384] [--hidden 64] [--layers 2] [--chunk 1024]
                                 [--layouts all,vita] [--real_layouts all] [--real_lengths 4096,16384]
                                 [--real_limit_gib 9] [--no_real] [--threads 2]

About 3 to 5 minutes on 2 CPU cores with the defaults, depending on other load (the real chunked step
at 16k tokens takes most of it); ``--no_real`` takes seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tensor_memory import LiveTensorBytes, fake_tensors  # noqa: E402

from vitacore.constants import IGNORE_INDEX  # noqa: E402

VOCAB = 151936  # Qwen2.5's vocabulary
LAYOUTS = ("all", "vita")
PATHS = ("plain", "chunked")
TURN, ANSWER = 512, 128  # the vita layout: per turn of 512 tokens, the last 128 are supervised
GIB = 2 ** 30


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,8192,16384", help="comma-separated sequence lengths")
    parser.add_argument("--hidden", type=int, default=64, help="the LLM's hidden size")
    parser.add_argument("--layers", type=int, default=2, help="the LLM's decoder layers")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size")
    parser.add_argument("--chunk", type=int, default=1024, help="loss_chunk_size of the chunked path")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="label layouts: all, vita")
    parser.add_argument("--real_limit_gib", type=float, default=9.0,
                        help="run a case on real tensors only when its fake peak is below this")
    parser.add_argument("--real_layouts", default="all", help="layouts also run on real tensors (where they fit)")
    parser.add_argument("--real_lengths", default=None,
                        help="lengths also run on real tensors (where they fit); default: the shortest and longest")
    parser.add_argument("--no_real", action="store_true", help="fake-tensor measurements only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the real runs")
    parser.add_argument("--real_case", default=None, help=argparse.SUPPRESS)  # worker: length:layout:path
    args = parser.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        parser.error(f"--lengths {args.lengths!r}: give comma-separated integers, e.g. 4096,8192")
    if not args.lengths or min(args.lengths) < 2:
        parser.error("--lengths: give at least one length of 2 tokens or more")
    try:
        args.real_lengths = ({min(args.lengths), max(args.lengths)} if args.real_lengths is None
                             else {int(x) for x in args.real_lengths.split(",") if x})
    except ValueError:
        parser.error(f"--real_lengths {args.real_lengths!r}: give comma-separated integers")
    args.layouts = [x for x in args.layouts.split(",") if x]
    args.real_layouts = [x for x in args.real_layouts.split(",") if x]
    for flag in ("layouts", "real_layouts"):
        if any(layout not in LAYOUTS for layout in getattr(args, flag)):
            parser.error(f"--{flag} {','.join(getattr(args, flag))}: choose from {', '.join(LAYOUTS)}")
    for name in ("hidden", "layers", "vocab", "chunk", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def build_model(args, length: int, path: str):
    """The VitaModel (LLM only) of one case, in training mode; random weights from seed 0."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vitacore.model.multimodal import VitaModel

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=2, num_key_value_heads=2,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    model = VitaModel(Qwen2ForCausalLM(config), model_max_length=length,
                      loss_chunk_size=args.chunk if path == "chunked" else 0)
    return model.train()


def make_batch(length: int, layout: str, vocab: int) -> dict:
    """Batch 1 of ``length`` random tokens, labelled as ``layout`` says."""
    generator = torch.Generator().manual_seed(length)
    input_ids = torch.randint(0, vocab, (1, length), generator=generator)
    labels = input_ids.clone()
    if layout == "vita":
        in_turn = torch.arange(length) % TURN
        labels[0, in_turn < TURN - ANSWER] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


def run_step(model, batch: dict) -> None:
    """One training step as the Trainer runs it: forward, the output dict dropped, backward."""
    output = model(**batch)
    loss = output["loss"]
    del output  # the Trainer frees the logits (full-logits path) before backward
    loss.backward()


def tracked_step(model, batch: dict) -> dict:
    """Run one step under the tracker; bytes live before it, its peak and what is left after it."""
    with LiveTensorBytes() as tracker:
        tracker.track([*model.parameters(), *model.buffers(), *batch.values()])
        before = tracker.live
        tracker.reset_peak()
        run_step(model, batch)
    return {"before": before, "peak": tracker.peak, "after": tracker.live}


@contextlib.contextmanager
def _fake_tensors_not_tracing():
    """transformers takes fake tensors for graph tracing and then always builds a full [L, L] attention
    mask, which the real step skips; so that the fake step is the real one, its mask checks read the
    real values (:mod:`tensor_memory` keeps them) as on real tensors."""
    from transformers.utils import import_utils

    original = import_utils.is_fake_tensor
    import_utils.is_fake_tensor = lambda tensor: False
    try:
        yield
    finally:
        import_utils.is_fake_tensor = original


def fake_case(args, length: int, layout: str, path: str) -> dict:
    """The tracker's figures for one case on fake tensors (no real memory): see :func:`tracked_step`."""
    started = time.time()
    real_batch = make_batch(length, layout, args.vocab)  # real: the fake step reads its values
    with _fake_tensors_not_tracing(), fake_tensors() as keeper:
        model = build_model(args, length, path)
        batch = {name: keeper.from_real(value) for name, value in real_batch.items()}
        figures = tracked_step(model, batch)
    figures["seconds"] = time.time() - started
    return figures


def _kib(path: str, field: str) -> int:
    """A ``kB`` field of a /proc file (``/proc/self/status``, ``/proc/meminfo``)."""
    with open(path) as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"{path} has no {field} line; the real runs need Linux")


def real_case(args, length: int, layout: str, path: str) -> dict:
    """One case on real tensors (run in a fresh process): resident-memory growth and the tracker."""
    torch.set_num_threads(args.threads)
    model = build_model(args, length, path)
    run_step(model, make_batch(min(length, 256), layout, args.vocab))  # warm-up: thread pools, kernels
    model.zero_grad(set_to_none=True)
    batch = make_batch(length, layout, args.vocab)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident size
    rss_before = _kib("/proc/self/status", "VmRSS") * 1024
    started = time.time()
    figures = tracked_step(model, batch)
    figures.update(seconds=time.time() - started, rss_growth=_kib("/proc/self/status", "VmHWM") * 1024 - rss_before)
    return figures


def spawn_real_case(args, length: int, layout: str, path: str) -> dict:
    """:func:`real_case` in a fresh process (its peak resident memory is its own)."""
    command = [sys.executable, os.path.abspath(__file__), "--real_case", f"{length}:{layout}:{path}",
               "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
               "--chunk", str(args.chunk), "--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the real run of {length}:{layout}:{path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.3f}"


def growth(figures: dict) -> int:
    """The step's peak minus what was live before it."""
    return figures["peak"] - figures["before"]


def report(args, fake: dict, real: dict, say=print) -> dict:
    """Print the side-by-side tables; return the ratio chunked/plain of step peaks per (layout, length)."""
    ratios = {}
    first = fake[next(iter(fake))]
    say(f"live before the step (parameters, buffers, inputs): {gib(first['before'])} GiB; one float32 copy of "
        f"the full logits: {', '.join(f'{gib(n * args.vocab * 4)} GiB at {n}' for n in args.lengths)}")
    for layout in args.layouts:
        share = "every token" if layout == "all" else f"{ANSWER} of every {TURN} tokens"
        say(f"\n[{layout}: {share} supervised] tracker on fake tensors, GiB")
        say(f"{'tokens':>7s} {'plain peak':>11s} {'chunked peak':>13s} {'ratio':>7s}   "
            f"{'plain growth':>13s} {'chunked growth':>15s} {'ratio':>7s}")
        for length in args.lengths:
            plain, chunked = fake[(length, layout, "plain")], fake[(length, layout, "chunked")]
            ratios[(layout, length)] = chunked["peak"] / plain["peak"]
            say(f"{length:7d} {gib(plain['peak']):>11s} {gib(chunked['peak']):>13s} {ratios[(layout, length)]:7.3f}   "
                f"{gib(growth(plain)):>13s} {gib(growth(chunked)):>15s} {growth(chunked) / growth(plain):7.3f}")
    if real:
        say("\ncross-check where the step fits in memory (step growth, GiB): the tracker on fake tensors, on "
            "real tensors,\nand the real process's resident-memory growth")
        say(f"{'case':>24s} {'fake tracker':>13s} {'real tracker':>13s} {'rss':>8s} {'rss/fake':>9s} "
            f"{'real/fake':>10s} {'step s':>7s}")
        for key, measured in real.items():
            expected = growth(fake[key])
            say(f"{':'.join(map(str, key)):>24s} {gib(expected):>13s} {gib(growth(measured)):>13s} "
                f"{gib(measured['rss_growth']):>8s} {measured['rss_growth'] / expected:9.3f} "
                f"{growth(measured) / expected:10.4f} {measured['seconds']:7.1f}")
        for length, layout, path in real:
            if path == "plain" and (length, layout, "chunked") in real:
                rss = real[(length, layout, "chunked")]["rss_growth"] / real[(length, layout, "plain")]["rss_growth"]
                tracked = growth(fake[(length, layout, "chunked")]) / growth(fake[(length, layout, "plain")])
                say(f"ratio chunked/plain of rss growth at {length} tokens ({layout}): {rss:.3f}; "
                    f"of the fake tracker's growth: {tracked:.3f}")
    longest = max(args.lengths)
    for layout in args.layouts:
        say(f"ratio chunked/plain step peak at {longest} tokens ({layout}): {ratios[(layout, longest)]:.3f}")
    return ratios


def main(argv=None) -> int:
    args = parse(argv)
    if args.real_case:
        length, layout, path = args.real_case.split(":")
        print(json.dumps(real_case(args, int(length), layout, path)))
        return 0
    started = time.time()
    print(f"model: random Qwen2, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab:,}, untied head, "
          f"float32, batch 1; chunked path: loss_chunk_size {args.chunk}")
    fake, real = {}, {}
    for length in args.lengths:
        for layout in args.layouts:
            for path in PATHS:
                fake[(length, layout, path)] = fake_case(args, length, layout, path)
    if not args.no_real:
        for key, figures in fake.items():
            if key[0] not in args.real_lengths or key[1] not in args.real_layouts:
                continue
            room = min(args.real_limit_gib * GIB, 0.5 * _kib("/proc/meminfo", "MemAvailable") * 1024)
            if figures["peak"] < room:
                real[key] = spawn_real_case(args, *key)
            else:
                print(f"real run skipped for {':'.join(map(str, key))}: fake peak {gib(figures['peak'])} GiB "
                      f"> {gib(room)} GiB")
    report(args, fake, real)
    load = os.getloadavg()[0]
    print(f"(total wall time {time.time() - started:.0f}s; {os.cpu_count()} CPUs, 1-min load average {load:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
