"""VITA's freeze flags -> policy: every flag, unions, contradictions, regex priority (no model, no DeepSpeed)."""

import subprocess
import sys

import pytest

from vitacore.config import RunConfig
from vitacore.freeze import FreezePolicy, policy_from_config
from vitacore.model.multimodal import UNIT_PREFIXES

DEFAULTS = RunConfig()


def policy_for(**flags):
    cfg = RunConfig()
    for name, value in flags.items():
        cfg.set(name, value, "flag")
    return policy_from_config(cfg)


def trained(**flags):
    return set(policy_for(**flags).trained_units())


@pytest.mark.parametrize("flags, expected", [
    ({}, {"llm", "mm_projector"}),  # VITA's default: LLM + projector
    ({"tune_mm_mlp_adapter": True}, {"mm_projector"}),
    ({"tune_audio_mlp_adapter": True}, {"audio_adapter"}),
    ({"audio_prompt_finetune": True, "audio_prompt_num": 4}, {"audio_prompt"}),
    ({"audio_state_predictor_tuning": True}, {"state_head"}),
    ({"freeze_backbone": True}, {"mm_projector"}),
    ({"unfreeze_vision_tower": True}, {"llm", "mm_projector", "vision_tower"}),
    ({"freeze_audio_encoder": False}, {"llm", "mm_projector", "audio_encoder"}),
    ({"freeze_audio_encoder_adapter": False}, {"llm", "mm_projector", "audio_adapter"}),
    ({"freeze_mm_mlp_adapter": True}, {"llm"}),
    ({"lora_enable": True}, {"llm", "mm_projector"}),
])
def test_each_flag(flags, expected):
    assert trained(**flags) == expected


def test_lora_enable_puts_the_llm_in_lora_mode():
    assert policy_for(lora_enable=True).mode("llm") == "lora"
    assert policy_for().mode("llm") == "full"


def test_tune_switches_combine_as_a_union():
    # In VITA the second tune_* re-freezes the first; vitacore trains both.
    assert trained(tune_mm_mlp_adapter=True, tune_audio_mlp_adapter=True) == {"mm_projector", "audio_adapter"}
    assert trained(tune_mm_mlp_adapter=True, unfreeze_vision_tower=True) == {"mm_projector", "vision_tower"}
    assert trained(tune_audio_mlp_adapter=True, audio_prompt_finetune=True, audio_prompt_num=2) == {
        "audio_adapter", "audio_prompt"}


def test_projector_tune_and_freeze_contradict():
    with pytest.raises(ValueError) as err:
        policy_for(tune_mm_mlp_adapter=True, freeze_mm_mlp_adapter=True)
    assert "--tune_mm_mlp_adapter" in str(err.value) and "--freeze_mm_mlp_adapter" in str(err.value)


def test_audio_tune_contradicts_an_explicit_adapter_freeze_only():
    with pytest.raises(ValueError) as err:
        policy_for(tune_audio_mlp_adapter=True, freeze_audio_encoder_adapter=True)
    assert "--tune_audio_mlp_adapter" in str(err.value) and "--freeze_audio_encoder_adapter" in str(err.value)
    cfg = RunConfig()
    cfg.set("tune_audio_mlp_adapter", True, "flag")  # freeze_audio_encoder_adapter stays at its default True
    assert policy_from_config(cfg).trained_units() == ["audio_adapter"]


def test_regex_flags_reach_the_policy():
    policy = policy_for(trainable_regex=r"^llm\.lm_head\.", frozen_regex=r"\.bias$")
    assert policy.trainable_regex == r"^llm\.lm_head\." and policy.frozen_regex == r"\.bias$"


NAMES = [
    "llm.model.embed_tokens.weight", "llm.model.layers.0.mlp.up_proj.weight", "llm.lm_head.weight",
    "vision_tower.encoder.embeddings.patch_embedding.weight", "vision_tower.encoder.embeddings.patch_embedding.bias",
    "mm_projector.0.weight", "mm_projector.0.bias", "mm_projector.2.weight",
    "audio_encoder.layers.0.linear1.weight", "audio_adapter.project.weight",
]


def test_priority_frozen_regex_over_trainable_regex_over_unit_mode():
    policy = FreezePolicy({"mm_projector": "full"}, trainable_regex=r"patch_embedding", frozen_regex=r"\.bias$")
    result = policy.resolve(NAMES, UNIT_PREFIXES)
    assert result["mm_projector.0.weight"] and result["mm_projector.2.weight"]  # unit mode
    assert result["vision_tower.encoder.embeddings.patch_embedding.weight"]  # trainable_regex adds
    assert not result["vision_tower.encoder.embeddings.patch_embedding.bias"]  # frozen_regex beats both
    assert not result["mm_projector.0.bias"]  # frozen_regex beats the unit mode
    assert not result["llm.lm_head.weight"]


def test_lora_mode_trains_only_lora_weights_of_the_unit():
    names = NAMES + ["llm.model.layers.0.mlp.up_proj.lora_A.default.weight"]
    result = FreezePolicy({"llm": "lora"}).resolve(names, UNIT_PREFIXES)
    assert [n for n, t in result.items() if t] == ["llm.model.layers.0.mlp.up_proj.lora_A.default.weight"]


@pytest.mark.parametrize("field, flag", [("trainable_regex", "--trainable_regex"), ("frozen_regex", "--frozen_regex")])
def test_regex_that_matches_nothing_is_an_error(field, flag):
    policy = FreezePolicy({"mm_projector": "full"}, **{field: "no_such_parameter"})
    with pytest.raises(ValueError) as err:
        policy.resolve(NAMES, UNIT_PREFIXES)
    assert flag in str(err.value) and "no_such_parameter" in str(err.value)


def test_resolve_is_a_pure_function_of_names():
    policy = FreezePolicy({"audio_adapter": "full"})
    assert policy.resolve(NAMES, UNIT_PREFIXES) == policy.resolve(list(NAMES), UNIT_PREFIXES)
    assert [n for n, t in policy.resolve(NAMES, UNIT_PREFIXES).items() if t] == ["audio_adapter.project.weight"]


def test_freeze_translation_imports_no_deepspeed():
    code = ("import sys; import vitacore.freeze, vitacore.recipes.stages; from vitacore.config import RunConfig; "
            "vitacore.freeze.policy_from_config(RunConfig()); "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
