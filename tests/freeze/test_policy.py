"""Tests for vitacore.freeze: units, policies, and the trainable-parameter report."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from vitacore.freeze import (
    MODES,
    UNITS,
    FreezePolicy,
    assign_units,
    build_param_groups,
    build_report,
    format_report,
    unit_summary,
)
from vitacore.model.audio import AudioAdapter, AudioEncoder, AudioEncoderConfig
from vitacore.model.multimodal import UNIT_PREFIXES, VitaModel
from vitacore.model.projector import build_projector
from vitacore.model.vision import ImageSpec, VisionTower

PRESENT_UNITS = ("llm", "vision_tower", "mm_projector", "audio_encoder", "audio_adapter")


def _build_tiny_vita():
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=32, patch_size=16))
    tower = VisionTower(siglip, -2, False, ImageSpec(32, (0.5,) * 3, (0.5,) * 3), "tiny")
    encoder = AudioEncoder(AudioEncoderConfig(num_mel_bins=16, hidden_size=8, num_layers=1, num_heads=2, ffn_size=16))
    return VitaModel(llm, tower, build_projector("mlp2x_gelu", 16, 32), encoder, AudioAdapter(8, 32))


@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        model = _build_tiny_vita()
    assert all(p.is_meta for p in model.parameters())
    return model


@pytest.fixture(scope="module")
def names(meta_model):
    return [n for n, _ in meta_model.named_parameters()]


# ---- units -------------------------------------------------------------------
def test_assign_units_on_plain_names():
    names = ["llm.model.embed_tokens.weight", "vision_tower.encoder.x.weight", "mm_projector.0.weight",
             "audio_encoder.final_norm.bias", "audio_adapter.conv1d2.weight", "audio_prompt.weight",
             "state_head.bias"]
    assert assign_units(names, UNIT_PREFIXES) == {
        "llm.model.embed_tokens.weight": "llm",
        "vision_tower.encoder.x.weight": "vision_tower",
        "mm_projector.0.weight": "mm_projector",
        "audio_encoder.final_norm.bias": "audio_encoder",
        "audio_adapter.conv1d2.weight": "audio_adapter",
        "audio_prompt.weight": "audio_prompt",
        "state_head.bias": "state_head",
    }


def test_prefix_must_match_at_the_start_with_the_dot():
    # "llm_extra." and "xllm." are not under "llm."
    for bad in ("llm_extra.weight", "xllm.weight", "mm_projector_2.weight"):
        with pytest.raises(ValueError) as err:
            assign_units(["llm.ok", bad], UNIT_PREFIXES)
        assert repr(bad) in str(err.value)
        assert "no unit" in str(err.value)


def test_name_in_several_units_raises():
    prefixes = {"a": ("block.",), "b": ("block.inner.",)}
    with pytest.raises(ValueError, match="several units"):
        assign_units(["block.inner.weight"], prefixes)


def test_unit_prefixes_cover_the_model(meta_model, names):
    assignment = assign_units(names, UNIT_PREFIXES)
    assert set(assignment.values()) == set(PRESENT_UNITS)
    assert set(UNIT_PREFIXES) == set(UNITS)


# ---- policies ----------------------------------------------------------------
def test_policy_rejects_a_unit_the_model_does_not_declare():
    policy = FreezePolicy({"projector": "full"})  # constructing is fine: units belong to the model
    with pytest.raises(ValueError) as err:
        policy.resolve(["mm_projector.0.weight"], UNIT_PREFIXES)
    message = str(err.value)
    assert "'projector'" in message
    assert all(unit in message for unit in UNITS)


def test_policy_over_a_custom_models_own_units():
    prefixes = {"encoder": ("encoder.",), "head": ("head.",)}
    policy = FreezePolicy({"head": "full"})
    result = policy.resolve(["encoder.w", "encoder.b", "head.w"], prefixes)
    assert result == {"encoder.w": False, "encoder.b": False, "head.w": True}
    assert policy.trained_units() == ["head"]
    assert policy.eval_units(tuple(prefixes)) == ("encoder",)


def test_policy_rejects_unknown_mode():
    with pytest.raises(ValueError) as err:
        FreezePolicy({"llm": "partial"})
    message = str(err.value)
    assert "'partial'" in message and "'llm'" in message
    assert all(mode in message for mode in MODES)


def test_unnamed_units_are_frozen():
    policy = FreezePolicy({"mm_projector": "full", "llm": "lora"})
    assert policy.mode("vision_tower") == "frozen"
    assert policy.trained_units() == ["llm", "mm_projector"]


def test_resolve_is_a_pure_function_of_names(names):
    policy = FreezePolicy({"mm_projector": "full"})
    resolved = policy.resolve(names, UNIT_PREFIXES)
    assert set(resolved) == set(names)
    assert {n for n, t in resolved.items() if t} == {n for n in names if n.startswith("mm_projector.")}
    # same answer for hand-written names, without any model
    plain = ["llm.a", "mm_projector.0.weight", "mm_projector.2.bias", "audio_adapter.project.weight"]
    assert policy.resolve(plain, UNIT_PREFIXES) == {
        "llm.a": False, "mm_projector.0.weight": True, "mm_projector.2.bias": True,
        "audio_adapter.project.weight": False,
    }


def test_lora_units_train_only_lora_weights():
    policy = FreezePolicy({"llm": "lora", "mm_projector": "full"})
    names = ["llm.q_proj.weight", "llm.q_proj.lora_A.default.weight", "llm.q_proj.lora_B.default.weight",
             "mm_projector.w", "vision_tower.lora_A.weight"]
    assert policy.resolve(names, {**UNIT_PREFIXES}) == {
        "llm.q_proj.weight": False,
        "llm.q_proj.lora_A.default.weight": True,
        "llm.q_proj.lora_B.default.weight": True,
        "mm_projector.w": True,
        "vision_tower.lora_A.weight": False,  # frozen unit: LoRA weights there do not train
    }


def test_regex_overrides_frozen_wins():
    names = ["llm.model.layers.0.mlp.up_proj.weight", "llm.model.norm.weight", "llm.lm_head.weight",
             "mm_projector.0.weight", "mm_projector.0.bias"]
    policy = FreezePolicy({"mm_projector": "full"}, trainable_regex=r"^llm\..*norm", frozen_regex=r"\.bias$")
    assert policy.resolve(names, UNIT_PREFIXES) == {
        "llm.model.layers.0.mlp.up_proj.weight": False,
        "llm.model.norm.weight": True,       # trainable_regex adds it
        "llm.lm_head.weight": False,
        "mm_projector.0.weight": True,
        "mm_projector.0.bias": False,        # frozen_regex beats the unit's mode
    }
    both = FreezePolicy({}, trainable_regex="lm_head", frozen_regex="lm_head")
    assert both.resolve(names, UNIT_PREFIXES)["llm.lm_head.weight"] is False


@pytest.mark.parametrize("kwargs,flag", [({"trainable_regex": "no_such_layer"}, "--trainable_regex"),
                                         ({"frozen_regex": "nothing_here"}, "--frozen_regex")])
def test_regex_matching_nothing_names_the_flag(kwargs, flag):
    with pytest.raises(ValueError) as err:
        FreezePolicy({"llm": "full"}, **kwargs).resolve(["llm.a", "mm_projector.b"], UNIT_PREFIXES)
    assert flag in str(err.value)
    assert next(iter(kwargs.values())) in str(err.value)


@pytest.mark.parametrize("modes", [
    {"mm_projector": "full"},
    {"llm": "full", "mm_projector": "full"},
    {"audio_adapter": "full"},
    {"vision_tower": "full", "audio_encoder": "full", "llm": "frozen"},
])
def test_apply_sets_requires_grad_exactly(meta_model, modes):
    # start from the opposite of what the policy wants, so stale flags would show
    policy = FreezePolicy(modes)
    trained = {u for u, m in modes.items() if m == "full"}
    for name, param in meta_model.named_parameters():
        param.requires_grad_(name.split(".")[0] not in trained)
    result = policy.apply(meta_model, UNIT_PREFIXES)
    for name, param in meta_model.named_parameters():
        unit = name.split(".")[0]
        assert param.requires_grad == (unit in trained), name
        assert result[name] == param.requires_grad


def test_apply_records_frozen_encoders_as_eval_units(meta_model):
    FreezePolicy({"mm_projector": "full"}).apply(meta_model, UNIT_PREFIXES)
    eval_units = set(meta_model.eval_units)
    assert {"vision_tower", "audio_encoder", "audio_adapter"} <= eval_units
    assert "mm_projector" not in eval_units
    assert "llm" not in eval_units  # a frozen LLM follows the engine's mode
    meta_model.train()
    assert meta_model.llm.training and meta_model.mm_projector.training
    assert not meta_model.vision_tower.training and not meta_model.audio_encoder.training

    FreezePolicy({"vision_tower": "full", "llm": "full"}).apply(meta_model, UNIT_PREFIXES)
    assert "vision_tower" not in meta_model.eval_units
    assert {"mm_projector", "audio_encoder", "audio_adapter"} <= set(meta_model.eval_units)
    meta_model.train()
    assert meta_model.vision_tower.training and not meta_model.mm_projector.training


@pytest.mark.parametrize("modes,named", [
    ({}, "none"),
    ({"llm": "lora"}, "llm"),                          # LoRA adapters do not exist yet
])
def test_apply_with_nothing_trainable_raises_and_changes_nothing(meta_model, modes, named):
    meta_model.requires_grad_(True)
    with pytest.raises(ValueError) as err:
        FreezePolicy(modes).apply(meta_model, UNIT_PREFIXES)
    assert "no trainable parameter" in str(err.value)
    assert named in str(err.value)
    assert all(p.requires_grad for p in meta_model.parameters())


def test_frozen_regex_freezing_everything_raises(meta_model):
    with pytest.raises(ValueError, match="no trainable parameter"):
        FreezePolicy({"mm_projector": "full"}, frozen_regex=r"^mm_projector\.").apply(meta_model, UNIT_PREFIXES)


@pytest.mark.parametrize("unit", ["audio_prompt", "state_head"])
def test_apply_refuses_a_trained_unit_the_model_lacks(meta_model, unit):
    meta_model.requires_grad_(True)
    with pytest.raises(ValueError) as err:
        FreezePolicy({unit: "full", "mm_projector": "full"}).apply(meta_model, UNIT_PREFIXES)
    assert repr(unit) in str(err.value)
    assert all(p.requires_grad for p in meta_model.parameters())


def test_lora_on_a_unit_without_linear_layers_is_refused():
    model = VitaModel(torch.nn.Linear(2, 2), mm_projector=build_projector("identity", 4, 4))
    model.mm_projector.register_parameter("scale", torch.nn.Parameter(torch.ones(1)))
    with pytest.raises(ValueError, match="'mm_projector'.*lora"):
        FreezePolicy({"mm_projector": "lora"}).apply(model, UNIT_PREFIXES)


# ---- report ------------------------------------------------------------------
def _numel_by_prefix(model):
    totals = {}
    for name, param in model.named_parameters():
        for unit, prefixes in UNIT_PREFIXES.items():
            if name.startswith(prefixes):
                totals[unit] = totals.get(unit, 0) + param.numel()
    return totals


def test_report_totals_names_and_groups(meta_model):
    policy = FreezePolicy({"mm_projector": "full", "audio_adapter": "full"})
    policy.apply(meta_model, UNIT_PREFIXES)
    groups = build_param_groups(meta_model, UNIT_PREFIXES, learning_rate=2e-3, weight_decay=0.1)
    report = build_report(meta_model, UNIT_PREFIXES, policy, groups)

    totals = _numel_by_prefix(meta_model)
    assert set(report["units"]) == set(totals)
    for unit, entry in report["units"].items():
        assert entry["total"] == totals[unit], unit
        expected_trainable = totals[unit] if unit in ("mm_projector", "audio_adapter") else 0
        assert entry["trainable"] == expected_trainable, unit
        assert entry["mode"] == policy.mode(unit)
        assert entry["dtype"] == "float32"
        assert entry["lr"] == (2e-3 if expected_trainable else None), unit

    trainable_names = [n for n, p in meta_model.named_parameters() if p.requires_grad]
    assert report["trainable_names"] == trainable_names

    trainable_count = sum(p.numel() for p in meta_model.parameters() if p.requires_grad)
    assert sum(g["num_params"] for g in report["param_groups"]) == trainable_count
    for entry, group in zip(report["param_groups"], groups):
        assert set(entry) >= {"name", "lr", "weight_decay", "units", "num_params"}
        assert entry["lr"] == group["lr"] and entry["weight_decay"] == group["weight_decay"]
        assert entry["num_params"] == sum(p.numel() for p in group["params"])
        assert set(entry["units"]) <= {"mm_projector", "audio_adapter"}
    assert set().union(*(g["units"] for g in report["param_groups"])) == {"mm_projector", "audio_adapter"}


def test_report_lists_several_lrs_for_a_unit(meta_model):
    policy = FreezePolicy({"mm_projector": "full"})
    policy.apply(meta_model, UNIT_PREFIXES)
    params = dict(meta_model.named_parameters())
    groups = [
        {"name": "w", "params": [params["mm_projector.0.weight"]], "param_names": ["mm_projector.0.weight"],
         "lr": 1e-3, "weight_decay": 0.0},
        {"name": "b", "params": [params["mm_projector.0.bias"]], "param_names": ["mm_projector.0.bias"],
         "lr": 5e-4, "weight_decay": 0.0},
    ]
    report = build_report(meta_model, UNIT_PREFIXES, policy, groups)
    assert report["units"]["mm_projector"]["lr"] == [5e-4, 1e-3]
    assert "0.0005,0.001" in format_report(report)


def test_unit_summary_matches_requires_grad(meta_model):
    policy = FreezePolicy({"llm": "full"})
    policy.apply(meta_model, UNIT_PREFIXES)
    summary = unit_summary(meta_model, UNIT_PREFIXES, policy)
    totals = _numel_by_prefix(meta_model)
    assert summary["llm"]["trainable"] == summary["llm"]["total"] == totals["llm"]
    assert all(summary[u]["trainable"] == 0 for u in PRESENT_UNITS if u != "llm")


def test_format_report_rows_and_totals(meta_model):
    policy = FreezePolicy({"mm_projector": "full"})
    policy.apply(meta_model, UNIT_PREFIXES)
    report = build_report(meta_model, UNIT_PREFIXES, policy, build_param_groups(meta_model, UNIT_PREFIXES, 1e-3, 0.0))
    text = format_report(report)
    lines = text.splitlines()
    totals = _numel_by_prefix(meta_model)
    for unit in PRESENT_UNITS:
        row = next(line for line in lines if line.split()[0] == unit)
        assert f"{totals[unit]:,}" in row
        assert policy.mode(unit) in row
    trainable = totals["mm_projector"]
    total = sum(totals.values())
    last = lines[-1]
    assert last.split()[0] == "all"
    assert f"{trainable:,}" in last and f"{total:,}" in last
    assert f"{100.0 * trainable / total:.2f}%" in last
    projector_row = next(line for line in lines if line.startswith("mm_projector"))
    assert "0.001" in projector_row
