"""Sizes of ``bench/text_only_step.py``'s models and the analytic FLOP count of its text-only step.

The FLOPs follow ``bench/mfu_flops.py``'s rules; they are counted at the bench's scaled sizes and at
VITA-1.5's real ones, full-size dummy passes against the fewest-token ones.
"""

from __future__ import annotations

from mfu_flops import Part, decoder_layer_weights, encoder_layer_weights, part_flops

# Scaled (widened x2 by the bench's default --width 2) to about 2 s per step on two CPU cores, with VITA-1.5's
# proportions (matmul weights: tower about 1/17 of the LLM's, Whisper 1/21; depths 4 : 4 : 3 for 28 : 27 : 24)
# and the encoders' real input geometry.
SIZES = {
    "vita": dict(llm=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=1344, vocab_size=8192),
                 tower=dict(hidden_size=80, num_hidden_layers=4, num_attention_heads=4, intermediate_size=300,
                            image_size=384, patch_size=14),
                 whisper=dict(d_model=80, encoder_layers=3, encoder_attention_heads=4, encoder_ffn_dim=320,
                              max_source_positions=1500)),
    "quick": dict(llm=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=1024),
                  tower=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=384, patch_size=14),
                  whisper=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                               max_source_positions=1500)),
}
# VITA-1.5's real parts, for the analytic FLOP count: Qwen2.5-7B, SigLIP-so400m-patch14-384, Whisper-medium.
REAL = dict(llm=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     intermediate_size=18944, vocab_size=152064),
            tower=dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304,
                       image_size=384, patch_size=14),
            whisper=dict(d_model=1024, encoder_layers=24, encoder_attention_heads=16, encoder_ffn_dim=4096,
                         max_source_positions=1500))
MEL_BINS = 80
# Keys multiplied by ``--width``: every part's widths and head counts (head sizes, depths, vocabulary and input
# geometry stay), so the parts keep their proportions while the step's compute grows against per-module costs.
WIDTH_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "d_model",
              "encoder_attention_heads", "encoder_ffn_dim")


def widened(sizes: dict, width: int) -> dict:
    """``sizes`` with every part's widths and head counts multiplied by ``width``."""
    return {part: {key: value * width if key in WIDTH_KEYS else value for key, value in shape.items()}
            for part, shape in sizes.items()}


def analytic_flops(sizes: dict, args, fewest: bool) -> tuple[float, float, float]:
    """FLOPs of one text-only micro-batch step: (LLM, dummy vision pass, dummy audio pass).

    Counted with bench/mfu_flops.py's rules (matmuls and attention; forward, backward, recomputation).
    ``fewest``: the passes on their fewest tokens (1 token through the tower's and Whisper's layers;
    the patch embedding and Whisper's first convolution still see the full input).
    """
    lm, vt, wh = sizes["llm"], sizes["tower"], sizes["whisper"]
    heads = lm["num_attention_heads"]
    head_dim = lm["hidden_size"] // heads
    layer = decoder_layer_weights(lm["hidden_size"], heads, lm["num_key_value_heads"], head_dim,
                                  lm["intermediate_size"])
    seq, ckpt = args.text_tokens, not args.no_gradient_checkpointing
    llm = args.micro_batch * (part_flops(Part("llm", lm["num_hidden_layers"] * layer, seq, True, True, ckpt,
                                              lm["num_hidden_layers"], lm["hidden_size"], seq))
                              + part_flops(Part("logits", lm["vocab_size"] * lm["hidden_size"], seq, True, True)))
    patches = (vt["image_size"] // vt["patch_size"]) ** 2
    tokens = 1 if fewest else patches
    trains = args.stage == "3"
    width, used = vt["hidden_size"], vt["num_hidden_layers"] - 1  # features from hidden_states[-2]
    enc = encoder_layer_weights(width, vt["intermediate_size"])
    vision = (part_flops(Part("tower", used * enc, tokens, trains, trains, False, used, width, tokens))
              # the last layer and the pooling head's keys / values run forward only: nothing uses them
              + part_flops(Part("tower, forward only", enc + 2 * width * width, tokens, False, False, False, 1, width,
                                tokens))
              + part_flops(Part("patches", 3 * vt["patch_size"] ** 2 * width, patches, trains, False))
              + part_flops(Part("projector", width * lm["hidden_size"] + lm["hidden_size"] ** 2, tokens, True, False)))
    states = 1 if fewest else wh["max_source_positions"]
    d = wh["d_model"]
    audio = (part_flops(Part("whisper", wh["encoder_layers"] * encoder_layer_weights(d, wh["encoder_ffn_dim"]),
                             states, False, False, False, wh["encoder_layers"], d, states))
             + part_flops(Part("conv1", 3 * MEL_BINS * d, 2 * wh["max_source_positions"], False, False))
             + part_flops(Part("conv2", 3 * d * d, states, False, False)))
    return llm, vision, audio


def bench_sizes(args) -> dict:
    """The sizes this run builds: ``SIZES`` (quick or VITA-like) widened by ``--width``."""
    return widened(SIZES["quick" if args.quick else "vita"], args.width)


def print_flops(say, args) -> None:
    say("\nanalytic FLOPs of one text-only micro-batch step (bench/mfu_flops.py's rules), dummy passes / LLM step:")
    for name, sizes in (("these sizes", bench_sizes(args)), ("VITA-1.5's real sizes", REAL)):
        row = []
        for fewest in (False, True):
            llm, vision, audio = analytic_flops(sizes, args, fewest)
            row.append(f"{'fewest tokens' if fewest else 'full-size'} {(vision + audio) / llm:.4f} "
                       f"(vision {vision / llm:.4f}, audio {audio / llm:.4f})")
        say(f"  {name:22s} LLM step {llm / 1e12:9.4f} TFLOP; " + "; ".join(row))
