"""``--lora_bias`` in the freeze policy, on name lists alone (no peft, no model, no DeepSpeed)."""

import pytest

from vitacore.config import RunConfig
from vitacore.freeze import FreezePolicy, policy_from_config
from vitacore.model.multimodal import UNIT_PREFIXES

P = "llm.base_model.model.model.layers.0."
# peft's layout: an adapted layer X keeps its own tensors at X.base_layer.* beside X.lora_A / X.lora_B.
Q_LORA = [P + "self_attn.q_proj.lora_A.default.weight", P + "self_attn.q_proj.lora_B.default.weight"]
Q_BIAS = P + "self_attn.q_proj.base_layer.bias"
# An adapted layer named without peft's base_layer (X.bias beside X.lora_A): still an adapted layer.
UP_LORA = [P + "mlp.up_proj.lora_A.default.weight", P + "mlp.up_proj.lora_B.default.weight"]
UP_BIAS = P + "mlp.up_proj.bias"
K_BIAS = P + "self_attn.k_proj.bias"  # a layer without adapters
NAMES = [
    "llm.base_model.model.model.embed_tokens.weight",
    P + "self_attn.q_proj.base_layer.weight", Q_BIAS, *Q_LORA,
    P + "self_attn.k_proj.weight", K_BIAS,
    P + "mlp.up_proj.weight", UP_BIAS, *UP_LORA,
    P + "input_layernorm.weight",
    "llm.base_model.model.lm_head.weight",
    "vision_tower.encoder.embeddings.patch_embedding.weight", "vision_tower.encoder.embeddings.patch_embedding.bias",
    "mm_projector.0.weight", "mm_projector.0.bias",
]
PROJECTOR = {"mm_projector.0.weight", "mm_projector.0.bias"}
LORA = set(Q_LORA + UP_LORA)


def trained(policy):
    return {name for name, on in policy.resolve(NAMES, UNIT_PREFIXES).items() if on}


@pytest.mark.parametrize("lora_bias, biases", [
    ("none", set()),
    ("all", {Q_BIAS, K_BIAS, UP_BIAS}),
    ("lora_only", {Q_BIAS, UP_BIAS}),
])
def test_lora_bias_selects_exactly_these_biases(lora_bias, biases):
    policy = FreezePolicy({"llm": "lora", "mm_projector": "full"}, lora_bias=lora_bias)
    assert trained(policy) == LORA | PROJECTOR | biases


def test_lora_bias_only_touches_units_in_lora_mode():
    # The tower is frozen: its bias stays frozen even with --lora_bias all.
    policy = FreezePolicy({"llm": "lora"}, lora_bias="all")
    assert "vision_tower.encoder.embeddings.patch_embedding.bias" not in trained(policy)
    # A full unit trains its biases whatever lora_bias says.
    assert trained(FreezePolicy({"mm_projector": "full"}, lora_bias="none")) >= PROJECTOR


def test_regex_priority_over_lora_bias():
    # frozen_regex > trainable_regex > unit mode (lora + lora_bias).
    policy = FreezePolicy({"llm": "lora"}, lora_bias="all", frozen_regex=r"k_proj\.bias$")
    assert trained(policy) == LORA | {Q_BIAS, UP_BIAS}
    policy = FreezePolicy({"llm": "lora"}, lora_bias="none", trainable_regex=r"k_proj\.bias$")
    assert trained(policy) == LORA | {K_BIAS}
    policy = FreezePolicy({"llm": "lora"}, lora_bias="lora_only", trainable_regex="q_proj", frozen_regex="lora_B")
    assert trained(policy) == {Q_LORA[0], UP_LORA[0], Q_BIAS, UP_BIAS, P + "self_attn.q_proj.base_layer.weight"}


def test_unknown_lora_bias_is_refused():
    with pytest.raises(ValueError, match="--lora_bias"):
        FreezePolicy({"llm": "lora"}, lora_bias="some")


def test_flags_carry_lora_bias_with_lora_enable_only():
    cfg = RunConfig()
    cfg.set("lora_enable", True, "flag")
    cfg.set("lora_bias", "lora_only", "flag")
    assert policy_from_config(cfg).lora_bias == "lora_only"
    cfg.set("lora_enable", False, "flag")
    assert policy_from_config(cfg).lora_bias == "none"  # no lora unit, nothing to add biases to
