"""Analytic FLOP counts for bench/gpu_mfu.py: a stage-3 step of an LLM + vision tower, by shapes.

Pure Python, no torch, so the arithmetic is unit-tested on any machine.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Part:
    """A piece of the model, for FLOP counting. All counts are per sample.

    Attributes:
        name: label for the breakdown.
        weights: matmul weights applied to every token of the part (a ``Linear``'s in x out; biases,
            norms and embedding lookups are not matmuls and are left out).
        tokens: tokens per sample that go through the part.
        weight_grads: the weights train, so backward computes their gradients (+2 x weights x tokens).
        input_grads: gradients flow through the part to something trained before it (+2 x weights x tokens).
        recomputed: activation checkpointing runs its forward again during backward (+2 x weights x tokens).
        attn_layers / attn_width / attn_seq: attention layers in the part, query width (heads x head_dim)
            and the length attention runs over; the score and value matmuls cost 4 x width x seq^2 per
            layer forward, twice that backward, and the forward again when recomputed.
        attn_sequences: separate attention sequences of length ``attn_seq`` per sample (a tower attends
            within each image: one per image; 0 for a sample without images).
    """

    name: str
    weights: int
    tokens: int
    weight_grads: bool
    input_grads: bool
    recomputed: bool = False
    attn_layers: int = 0
    attn_width: int = 0
    attn_seq: int = 0
    attn_sequences: int = 1

    @property
    def backward(self) -> bool:
        return self.weight_grads or self.input_grads


def part_flops(part: Part) -> int:
    """FLOPs one sample costs in ``part`` for one training step (forward, backward, recomputation)."""
    matmul = 2 + 2 * part.weight_grads + 2 * part.input_grads + 2 * part.recomputed
    attention = 4 + 8 * part.backward + 4 * part.recomputed
    return (matmul * part.weights * part.tokens
            + attention * part.attn_sequences * part.attn_layers * part.attn_width * part.attn_seq * part.attn_seq)


def model_flops(part: Part) -> int:
    """Like :func:`part_flops` without the recomputation (the "model FLOPs" of the PaLM MFU definition)."""
    return part_flops(dataclasses.replace(part, recomputed=False))


def training_flops(parts: Sequence[Part], samples: int, recompute: bool = True) -> int:
    """FLOPs of one optimizer step over ``samples`` samples (``recompute`` False: without recomputation)."""
    count = part_flops if recompute else model_flops
    return samples * sum(count(p) for p in parts)


def decoder_layer_weights(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> int:
    """Matmul weights of one Llama/Qwen2-style decoder layer: q, k, v, o and the gated MLP."""
    return (hidden * heads * head_dim            # q_proj
            + 2 * hidden * kv_heads * head_dim   # k_proj, v_proj (grouped-query attention)
            + heads * head_dim * hidden          # o_proj
            + 3 * hidden * intermediate)         # gate_proj, up_proj, down_proj


def encoder_layer_weights(hidden: int, intermediate: int) -> int:
    """Matmul weights of one ViT/SigLIP encoder layer: q, k, v, o and the two-layer MLP."""
    return 4 * hidden * hidden + 2 * hidden * intermediate


@dataclass(frozen=True)
class Shapes:
    """What the FLOP count needs to know about the model and the batch."""

    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    llm_intermediate: int
    vocab: int
    tower_hidden: int
    tower_layers: int
    tower_intermediate: int
    patch_size: int
    channels: int
    patches: int            # patch tokens per image the tower runs over (its attention length)
    image_tokens: int       # feature tokens per image that reach the LLM
    tower_head: bool        # SigLIP's attention-pooling head (runs forward; its output is unused)
    select_layer: int       # hidden_states index the features come from (-2: the last layer runs forward only)
    text_tokens: int        # text tokens per sample (the image placeholder excluded)
    images_per_sample: int = 1
    head_tokens: Optional[int] = None  # positions the output head runs on (None: every position, full logits)


def stage3_parts(s: Shapes, checkpointing: bool, train_tower: bool = True) -> list[Part]:
    """The parts of a VITA/LLaVA-style model trained as stage 3 (LLM + projector + tower).

    The LLM sees ``text_tokens + images x image_tokens`` positions and computes logits at every one
    with full logits, or at the ``head_tokens`` supervised ones with the chunked loss (the tied /
    untied output projection is a matmul either way). Activation checkpointing (vitacore
    enables it on the LLM only) recomputes each decoder layer's forward. The tower's layers after
    ``select_layer`` (and SigLIP's pooling head) run forward only: nothing downstream uses them.
    """
    seq = s.text_tokens + s.images_per_sample * s.image_tokens
    layer = decoder_layer_weights(s.llm_hidden, s.llm_heads, s.llm_kv_heads, s.llm_head_dim, s.llm_intermediate)
    width = s.llm_heads * s.llm_head_dim
    used = s.tower_layers + 1 + s.select_layer if s.select_layer < 0 else s.select_layer  # layers on the grad path
    unused = s.tower_layers - used
    tokens = s.images_per_sample * s.patches
    enc = encoder_layer_weights(s.tower_hidden, s.tower_intermediate)
    parts = [
        Part("llm decoder layers", s.llm_layers * layer, seq, True, True, checkpointing,
             s.llm_layers, width, seq),
        Part("llm output projection (logits)", s.vocab * s.llm_hidden,
             seq if s.head_tokens is None else s.head_tokens, True, True),
        Part("mm_projector", s.tower_hidden * s.llm_hidden + s.llm_hidden * s.llm_hidden,
             s.images_per_sample * s.image_tokens, True, train_tower),
        Part("vision tower layers (trained)", used * enc, tokens, train_tower, train_tower, False,
             used, s.tower_hidden, s.patches, s.images_per_sample),
        Part("vision patch embedding", s.channels * s.patch_size * s.patch_size * s.tower_hidden, tokens,
             train_tower, False),
    ]
    if unused:
        parts.append(Part("vision tower layers after select_layer (forward only)", unused * enc, tokens, False,
                          False, False, unused, s.tower_hidden, s.patches, s.images_per_sample))
    if s.tower_head:
        # Its key/value projections run over every patch; its 1-token query, output and MLP are ignored.
        parts.append(Part("vision pooling head (forward only)", 2 * s.tower_hidden * s.tower_hidden, tokens,
                          False, False))
    return parts


@functools.lru_cache(maxsize=None)
def sample_flops(shapes: Shapes, checkpointing: bool) -> tuple[int, int]:
    """``(FLOPs with the recomputation, model FLOPs without it)`` of one sample of ``shapes`` per step."""
    parts = stage3_parts(shapes, checkpointing)
    return training_flops(parts, 1, recompute=True), training_flops(parts, 1, recompute=False)


FORMULA = """FLOPs per sample and step = sum over parts of
    (2 + 2*[weights train] + 2*[gradient flows through] + 2*[recomputed]) * N * tokens        (matmuls)
  + (4 + 8*[backward runs] + 4*[recomputed]) * layers * width * seq^2                         (attention)
  N: matmul weights of the part (biases, norms, embedding lookups left out); width: heads*head_dim.
  Fully trained parts: 6*N*tokens (forward 2N, backward 4N) + 12*layers*width*seq^2 per sample; the
  LLM's checkpointed decoder layers add 2*N*tokens + 4*layers*width*seq^2. Attention is counted in
  full (no causal halving, as in the PaLM MFU), per sample over its own length (in a packed row only
  each sample's own block; padding positions count nothing) and per image in the tower. The output
  head counts every position with full logits, the supervised ones with the chunked loss (where it
  runs). The frozen audio encoder's dummy pass is ignored (tiny).
  MFU = model FLOPs (no recomputation) / time / peak; HFU also counts the recomputation."""
