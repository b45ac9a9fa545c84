"""The FLOP arithmetic of bench/gpu_mfu.py (bench/mfu_flops.py), checked against hand-derived counts."""

import importlib.util
import os
import sys

import pytest

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "gpu_mfu.py")


@pytest.fixture(scope="module")
def mfu():
    spec = importlib.util.spec_from_file_location("bench_gpu_mfu", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the file executes
    spec.loader.exec_module(module)
    import mfu_flops  # on sys.path once gpu_mfu.py is loaded

    for name in dir(mfu_flops):  # the script and its FLOP module, as one namespace for the tests
        if not name.startswith("_") and not hasattr(module, name):
            setattr(module, name, getattr(mfu_flops, name))
    yield module
    sys.modules.pop(spec.name, None)


def test_matmul_terms(mfu):
    def part(**flags):
        return mfu.Part("x", weights=10, tokens=3, **flags)

    assert mfu.part_flops(part(weight_grads=True, input_grads=True)) == 6 * 10 * 3      # fwd 2N + bwd 4N
    assert mfu.part_flops(part(weight_grads=True, input_grads=True, recomputed=True)) == 8 * 10 * 3
    assert mfu.part_flops(part(weight_grads=True, input_grads=False)) == 4 * 10 * 3     # e.g. a patch embedding
    # a frozen LLM under a trained projector
    assert mfu.part_flops(part(weight_grads=False, input_grads=True)) == 4 * 10 * 3
    assert mfu.part_flops(part(weight_grads=False, input_grads=False)) == 2 * 10 * 3    # forward only


def test_attention_terms(mfu):
    def attn(**flags):
        return mfu.Part("a", weights=0, tokens=3, attn_layers=2, attn_width=4, attn_seq=3, **flags)

    assert mfu.part_flops(attn(weight_grads=True, input_grads=True)) == 12 * 2 * 4 * 3**2
    assert mfu.part_flops(attn(weight_grads=True, input_grads=True, recomputed=True)) == 16 * 2 * 4 * 3**2
    assert mfu.part_flops(attn(weight_grads=False, input_grads=False)) == 4 * 2 * 4 * 3**2


def test_model_flops_drop_the_recomputation_and_samples_multiply(mfu):
    p = mfu.Part("x", 10, 3, True, True, True, 2, 4, 3)
    assert mfu.part_flops(p) == 8 * 30 + 16 * 72
    assert mfu.model_flops(p) == 6 * 30 + 12 * 72
    assert mfu.training_flops([p, p], samples=5) == 5 * 2 * (8 * 30 + 16 * 72)
    assert mfu.training_flops([p], samples=5, recompute=False) == 5 * (6 * 30 + 12 * 72)


def test_layer_weights_of_the_benchmarked_sizes(mfu):
    # Qwen2.5-0.5B: q 896x896, k and v 896x(2x64), o 896x896, gate/up/down 3x896x4864.
    assert mfu.decoder_layer_weights(896, 14, 2, 64, 4864) == 802_816 + 2 * 114_688 + 802_816 + 13_074_432
    assert 24 * mfu.decoder_layer_weights(896, 14, 2, 64, 4864) == 357_826_560  # the model card's "0.36B non-embedding"
    # SigLIP so400m-like: 4 x 1152^2 attention + 2 x 1152 x 4304 MLP.
    assert mfu.encoder_layer_weights(1152, 4304) == 5_308_416 + 9_916_416


def test_stage3_total_for_qwen05b_and_siglip(mfu):
    shapes = mfu.Shapes(llm_hidden=896, llm_layers=24, llm_heads=14, llm_kv_heads=2, llm_head_dim=64,
                        llm_intermediate=4864, vocab=151936, tower_hidden=1152, tower_layers=27,
                        tower_intermediate=4304, patch_size=14, channels=3, patches=729, image_tokens=729,
                        tower_head=True, select_layer=-2, text_tokens=1024)
    seq = 1024 + 729
    layer, enc = 14_909_440, 15_224_832
    expected = (
        8 * 24 * layer * seq + 16 * 24 * 896 * seq**2          # checkpointed decoder layers + attention
        + 6 * 151936 * 896 * seq                               # logits at every position
        + 6 * (1152 * 896 + 896 * 896) * 729                   # mlp2x_gelu projector
        + 6 * 26 * enc * 729 + 12 * 26 * 1152 * 729**2         # tower layers up to hidden_states[-2]
        + 4 * (3 * 14 * 14 * 1152) * 729                       # patch embedding (no input gradient)
        + 2 * enc * 729 + 4 * 1152 * 729**2                    # the last tower layer, forward only
        + 2 * (2 * 1152 * 1152) * 729                          # pooling head's key/value projections
    )
    parts = mfu.stage3_parts(shapes, checkpointing=True)
    assert mfu.training_flops(parts, samples=1) == expected
    assert 9.3e12 < expected < 9.6e12  # about 9.4 TFLOP per sample
    without = expected - (2 * 24 * layer * seq + 4 * 24 * 896 * seq**2)
    assert mfu.training_flops(parts, samples=4, recompute=False) == 4 * without
    assert mfu.training_flops(mfu.stage3_parts(shapes, checkpointing=False), samples=1) == without


def test_frozen_tower_gets_no_backward(mfu):
    shapes = mfu.Shapes(896, 24, 14, 2, 64, 4864, 151936, 1152, 27, 4304, 14, 3, 729, 729, False, -1, 1024)
    by_name = {p.name: p for p in mfu.stage3_parts(shapes, checkpointing=False, train_tower=False)}
    tower = by_name["vision tower layers (trained)"]
    assert mfu.part_flops(tower) == 2 * 27 * 15_224_832 * 729 + 4 * 27 * 1152 * 729**2
    assert mfu.part_flops(by_name["mm_projector"]) == 4 * (1152 * 896 + 896 * 896) * 729
    assert "vision tower layers after select_layer (forward only)" not in by_name


def test_peak_table(mfu):
    assert mfu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert mfu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert mfu.peak_tflops("NVIDIA H200") == 989.0
    assert mfu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert mfu.peak_tflops("Tesla T4") is None


def test_without_a_gpu_it_says_so(mfu, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert mfu.main(["--steps", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_tower_attention_counts_per_image_and_head_per_position(mfu):
    """Setup: the Qwen2.5-0.5B / SigLIP shapes with 0, 1 and 2 images per sample; the output head over every
    position (full logits) and over 100 supervised positions (chunked loss).
    Expect: the tower's attention is per image (two images cost twice one; a text-only sample has no tower
    FLOPs); the head's FLOPs follow the positions it runs on."""
    def shapes(images, head=None):
        return mfu.Shapes(896, 24, 14, 2, 64, 4864, 151936, 1152, 27, 4304, 14, 3, 729, 729, True, -2, 500,
                          images_per_sample=images, head_tokens=head)

    def by_name(s):
        return {p.name: mfu.part_flops(p) for p in mfu.stage3_parts(s, checkpointing=False)}

    one, two, none = by_name(shapes(1)), by_name(shapes(2)), by_name(shapes(0))
    tower = "vision tower layers (trained)"
    assert two[tower] == 2 * one[tower] and none[tower] == 0 and none["mm_projector"] == 0
    assert one[tower] == 6 * 26 * 15_224_832 * 729 + 12 * 26 * 1152 * 729**2
    head = "llm output projection (logits)"
    assert one[head] == 6 * 151936 * 896 * (500 + 729)
    assert by_name(shapes(1, head=100))[head] == 6 * 151936 * 896 * 100
    assert mfu.sample_flops(shapes(1), False)[0] == sum(one.values())
