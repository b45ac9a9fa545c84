"""FLOP accounting: each rule against numbers worked out by hand."""

import pytest

from vitacore.model.flops import ModuleCost, attention_flops, mfu, peak_flops, step_flops


def test_forward_only_for_a_frozen_module_with_nothing_trainable_before_it():
    assert ModuleCost(num_weights=10, num_tokens=3, trains=False).flops() == 2 * 10 * 3


def test_trained_module_costs_six_n_t():
    assert ModuleCost(10, 3, trains=True).flops() == 6 * 10 * 3


def test_frozen_module_with_gradients_passing_costs_four_n_t():
    assert ModuleCost(10, 3, trains=False, gradient_passes=True).flops() == 4 * 10 * 3


def test_recomputation_adds_one_forward():
    assert ModuleCost(10, 3, trains=True, recomputed=True).flops() == 8 * 10 * 3
    assert ModuleCost(10, 3, trains=False, gradient_passes=True, recomputed=True).flops() == 6 * 10 * 3


def test_attention_flops_scale_with_the_square_of_length():
    assert attention_flops(2, 8, [4]) == 4 * 2 * 8 * 16
    assert attention_flops(2, 8, [4, 8]) == 4 * 2 * 8 * (16 + 64)
    cost = ModuleCost(0, 0, trains=True, attention_flops=100.0)
    assert cost.flops() == 300.0


def test_step_flops_sums_the_modules():
    costs = [ModuleCost(10, 3, trains=True), ModuleCost(5, 2, trains=False)]
    assert step_flops(costs) == 180 + 20


def test_mfu_against_the_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989e12)
    assert peak_flops("Some CPU") is None
    assert mfu(989e12, 1.0, 1, "NVIDIA H200") == pytest.approx(1.0)
    assert mfu(989e12, 2.0, 2, "NVIDIA H200") == pytest.approx(0.25)
    assert mfu(1.0, 1.0, 1, "cpu") is None


def test_model_records_flops_and_training_the_llm_adds_two_n_t():
    import torch
    from tiny_models import TINY, build_tiny_vita

    from vitacore.constants import IMAGE_TOKEN_INDEX

    model = build_tiny_vita()
    model.count_flops = True
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 6, 7, 8]])
    batch = {"input_ids": ids, "labels": ids.clamp(min=0), "attention_mask": torch.ones_like(ids),
             "images": torch.randn(1, 3, TINY["image_size"], TINY["image_size"])}
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("mm_projector."))
    model(**batch)
    frozen_llm = model.last_flops
    for param in model.llm.parameters():
        param.requires_grad_(True)
    model(**batch)
    llm_weights = sum(p.numel() for n, p in model.llm.named_parameters() if "embed" not in n)
    tokens = 4 + (TINY["image_size"] // TINY["patch_size"]) ** 2  # 4 text tokens + the image's patches
    cfg = model.llm.config
    attention = 4 * cfg.num_hidden_layers * cfg.hidden_size * tokens * tokens
    # Frozen-but-passing costs 4NT + 2A; trained costs 6NT + 3A: the difference is 2NT + A.
    assert model.last_flops - frozen_llm == pytest.approx(2 * llm_weights * tokens + attention)
    assert frozen_llm > 4 * llm_weights * tokens
