"""Tests for the optimizer parameter groups (vitacore.freeze.param_groups; formerly engine.param_groups)."""

import pytest
import torch
import torch.nn as nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from vitacore.freeze.param_groups import build_param_groups, no_decay_names, unit_learning_rates
from vitacore.freeze.units import UNITS
from vitacore.model.audio import AudioAdapter, AudioEncoder, AudioEncoderConfig
from vitacore.model.multimodal import UNIT_PREFIXES, VitaModel
from vitacore.model.projector import build_projector

LLM_ONLY = {"llm": ("model.", "lm_head.")}


@pytest.fixture
def qwen():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))


@pytest.fixture
def vita():
    """LLM + projector + audio stack (no vision tower: the projector is fed by hand)."""
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
    encoder = AudioEncoder(AudioEncoderConfig(num_mel_bins=16, hidden_size=8, num_layers=1, num_heads=2, ffn_size=16))
    return VitaModel(llm, None, build_projector("mlp2x_gelu", 16, 32), encoder, AudioAdapter(8, 32))


def _expected_split(model):
    """Decay / no-decay by module type, written out rule by rule."""
    decay, no_decay = set(), set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, (nn.Embedding, nn.LayerNorm, Qwen2RMSNorm)):
                no_decay.add(full)
            elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                (decay if param_name == "weight" else no_decay).add(full)
            else:
                raise AssertionError(f"test does not know how to classify {full} ({type(module).__name__})")
    return decay, no_decay


def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_qwen_split_by_parameter_kind(qwen):
    expected_decay, expected_no_decay = _expected_split(qwen)
    groups = _by_name(build_param_groups(qwen, LLM_ONLY, learning_rate=1e-3, weight_decay=0.1))
    assert set(groups) == {"llm", "llm.no_decay"}
    assert set(groups["llm"]["param_names"]) == expected_decay
    assert set(groups["llm.no_decay"]["param_names"]) == expected_no_decay
    # spot checks by name
    assert "model.embed_tokens.weight" in expected_no_decay
    assert "model.layers.0.input_layernorm.weight" in expected_no_decay
    assert "model.norm.weight" in expected_no_decay
    assert "model.layers.0.self_attn.q_proj.bias" in expected_no_decay
    assert "model.layers.0.self_attn.q_proj.weight" in expected_decay
    assert "lm_head.weight" in expected_decay
    assert no_decay_names(qwen) == expected_no_decay


def test_group_hyperparameters(qwen):
    groups = _by_name(build_param_groups(qwen, LLM_ONLY, learning_rate=3e-4, weight_decay=0.05))
    assert groups["llm"]["weight_decay"] == 0.05
    assert groups["llm.no_decay"]["weight_decay"] == 0.0
    assert groups["llm"]["lr"] == groups["llm.no_decay"]["lr"] == 3e-4


def test_every_trainable_param_in_exactly_one_group_and_names_aligned(qwen):
    frozen_prefixes = ("model.embed_tokens.", "model.layers.0.")
    for name, param in qwen.named_parameters():
        param.requires_grad_(not name.startswith(frozen_prefixes))
    groups = build_param_groups(qwen, LLM_ONLY, 1e-3, 0.1)
    params = dict(qwen.named_parameters())
    seen = []
    for group in groups:
        assert len(group["params"]) == len(group["param_names"])
        for name, param in zip(group["param_names"], group["params"]):
            assert param is params[name]
            seen.append(name)
    trainable = [n for n, p in qwen.named_parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable)
    assert len(seen) == len(set(seen))
    assert not any(name.startswith(frozen_prefixes) for name in seen)


def test_only_no_decay_params_trainable_gives_one_group(qwen):
    for name, param in qwen.named_parameters():
        param.requires_grad_("norm" in name)
    groups = build_param_groups(qwen, LLM_ONLY, 1e-3, 0.1)
    assert [g["name"] for g in groups] == ["llm.no_decay"]
    assert all("norm" in n for n in groups[0]["param_names"])


def test_all_frozen_raises(qwen):
    qwen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_param_groups(qwen, LLM_ONLY, 1e-3, 0.1)


def test_groups_drive_adamw_decay(qwen):
    """With zero gradients AdamW only applies decoupled decay: p <- p * (1 - lr * wd)."""
    lr, wd = 0.1, 0.5
    groups = build_param_groups(qwen, LLM_ONLY, lr, wd)
    before = {n: p.detach().clone() for n, p in qwen.named_parameters()}
    optimizer = torch.optim.AdamW(groups)
    for param in qwen.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    decayed = set(_by_name(groups)["llm"]["param_names"])
    for name, param in qwen.named_parameters():
        factor = 1 - lr * wd if name in decayed else 1.0
        torch.testing.assert_close(param.detach(), before[name] * factor, msg=name)


def test_groups_per_unit_with_unit_rates(vita):
    for name, param in vita.named_parameters():
        param.requires_grad_(not name.startswith("audio_encoder."))
    rates = {"mm_projector": 2e-5, "audio_adapter": 7e-4}
    groups = build_param_groups(vita, UNIT_PREFIXES, 1e-3, 0.1, unit_rates=rates)
    by_name = _by_name(groups)
    assert set(by_name) == {"llm", "llm.no_decay", "mm_projector", "mm_projector.no_decay",
                            "audio_adapter", "audio_adapter.no_decay"}
    for name, group in by_name.items():
        unit = name.split(".")[0]
        assert group["lr"] == rates.get(unit, 1e-3), name
        assert all(n.startswith(unit + ".") for n in group["param_names"]), name
    assert set(by_name["mm_projector"]["param_names"]) == {"mm_projector.0.weight", "mm_projector.2.weight"}
    assert set(by_name["mm_projector.no_decay"]["param_names"]) == {"mm_projector.0.bias", "mm_projector.2.bias"}
    assert set(by_name["audio_adapter.no_decay"]["param_names"]) == {
        "audio_adapter.conv1d2.bias", "audio_adapter.bn2.weight", "audio_adapter.bn2.bias",
        "audio_adapter.project.bias"}
    # ordered by unit (UNITS order), decay group before no-decay group
    order = [(UNITS.index(g["name"].split(".")[0]), g["name"].endswith(".no_decay")) for g in groups]
    assert order == sorted(order)


def test_per_unit_rates_survive_an_optimizer_step(vita):
    groups = build_param_groups(vita, UNIT_PREFIXES, 1e-3, 0.0, unit_rates={"mm_projector": 1e-2})
    optimizer = torch.optim.AdamW(groups)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["mm_projector"] == 1e-2
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["llm"] == 1e-3


def test_unit_learning_rates_defaults_to_learning_rate():
    assert unit_learning_rates(1e-3) == dict.fromkeys(UNITS, 0.001)


def test_vision_tower_lr_defaults_to_projector_lr():
    rates = unit_learning_rates(1e-3, mm_projector_lr=2e-5)
    assert rates["mm_projector"] == 2e-5 and rates["vision_tower"] == 2e-5
    assert all(rates[u] == 1e-3 for u in UNITS if u not in ("mm_projector", "vision_tower"))


def test_specific_rates_win():
    rates = unit_learning_rates(1e-3, mm_projector_lr=2e-5, vision_tower_lr=1e-6)
    assert rates["vision_tower"] == 1e-6 and rates["mm_projector"] == 2e-5
    rates = unit_learning_rates(1e-3, mm_projector_lr=2e-5, vision_tower_lr=1e-6,
                                unit_lr={"vision_tower": 3e-6, "llm": 5e-6})
    assert rates["vision_tower"] == 3e-6 and rates["llm"] == 5e-6 and rates["mm_projector"] == 2e-5
    assert rates["audio_adapter"] == 1e-3
    assert set(rates) == set(UNITS)


def test_custom_modules_norm_by_class_name():
    class MyFancyNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(4))

    model = nn.Sequential(nn.Linear(4, 4), MyFancyNorm(), Scale(), nn.BatchNorm1d(4), nn.GroupNorm(2, 4))
    names = no_decay_names(model)
    assert names == {"0.bias", "1.gain", "3.weight", "3.bias", "4.weight", "4.bias"}


def test_attention_in_proj_bias_gets_no_decay(vita):
    groups = _by_name(build_param_groups(vita, UNIT_PREFIXES, 1e-3, 0.1))
    biases = {n for n, _ in vita.audio_encoder.named_parameters(prefix="audio_encoder") if n.endswith("bias")}
    assert "audio_encoder.layers.layers.0.self_attn.in_proj_bias" in biases
    assert biases <= set(groups["audio_encoder.no_decay"]["param_names"])
