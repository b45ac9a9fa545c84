"""LoRA on the LLM and 4/8-bit loading: real peft and bitsandbytes layers on CPU, tiny random models."""

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn
from tiny_models import TINY, build_tiny_vita
from transformers import AutoModelForCausalLM

import vitacore
from vitacore.checkpoint import read_lora_weights
from vitacore.config import ConfigError, parse_args
from vitacore.freeze import FreezePolicy
from vitacore.model import UNIT_PREFIXES, LoraSpec, QuantSpec, apply_lora, find_lora_targets
from vitacore.model.lora import kbit_load_kwargs
from vitacore.recipes import build_model_from_config, start_weights

QWEN2_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
WRAPPER = "llm.base_model.model."
BNB_LAYERS = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def lora_spec(**overrides):
    """``--lora_enable True --lora_r 4 --lora_alpha 8 --lora_dropout 0`` (other LoRA flags at their defaults)."""
    values = dict(r=4, alpha=8, dropout=0.0)
    values.update(overrides)
    return LoraSpec(**values)


def adapted_layers(model):
    """LLM layer names (without peft's wrapper) that carry a LoRA adapter."""
    return {n[len(WRAPPER):].split(".lora_A.")[0] for n, _ in model.named_parameters() if ".lora_A." in n}


def plain_linear_names(llm):
    return {name for name, module in llm.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"}


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """The tiny vita's LLM saved as a folder, so it can be loaded quantized."""
    path = tmp_path_factory.mktemp("tiny_llm")
    build_tiny_vita().llm.save_pretrained(path)
    return str(path)


def kbit_vita(llm_dir, bits, **overrides):
    model = build_tiny_vita()
    model.llm = AutoModelForCausalLM.from_pretrained(
        llm_dir, dtype=torch.float32, **kbit_load_kwargs(QuantSpec(bits=bits), torch.float32, lora_enabled=True))
    apply_lora(model, lora_spec(**overrides), torch.float32)
    return model


def text_batch(seed=0, batch=2, length=12):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (batch, length), generator=generator)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def test_discovery_lists_every_llm_linear_but_lm_head():
    assert find_lora_targets(build_tiny_vita().llm) == QWEN2_TARGETS


def test_apply_lora_adapts_only_the_llm():
    model = build_tiny_vita()
    expected = plain_linear_names(model.llm)
    assert any(isinstance(m, nn.Linear) for m in model.mm_projector.modules())  # would be found model-wide
    apply_lora(model, lora_spec(), torch.float32)
    assert adapted_layers(model) == expected
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all(n.startswith(WRAPPER) for n in lora_names)
    assert type(model.llm).__name__ == "PeftModelForCausalLM"
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, lora_spec(), torch.float32)


def test_explicit_targets():
    model = build_tiny_vita()
    apply_lora(model, lora_spec(target_modules=" q_proj, v_proj "), torch.float32)
    assert adapted_layers(model) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}


def test_a_target_matching_nothing_names_the_flag_and_the_choices():
    with pytest.raises(ValueError) as err:
        apply_lora(build_tiny_vita(), lora_spec(target_modules="q_proj,qkv_proj"), torch.float32)
    message = str(err.value)
    assert "--lora_target_modules" in message and "'qkv_proj'" in message
    assert "available: " + ", ".join(QWEN2_TARGETS) in message


def test_4bit_quantizes_the_llm_linears_only(llm_dir):
    model = kbit_vita(llm_dir, 4)
    llm_bnb = {name for name, m in model.llm.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert all(name.endswith(".base_layer") for name in llm_bnb)  # peft wraps each quantized layer
    assert {name[: -len(".base_layer")] for name in llm_bnb} == {f"base_model.model.{n}" for n in adapted_layers(model)}
    assert type(model.llm.get_output_embeddings()) is nn.Linear  # lm_head skipped
    for unit in ("vision_tower", "mm_projector", "audio_encoder", "audio_adapter"):
        module = getattr(model, unit)
        assert not any(isinstance(m, BNB_LAYERS) for m in module.modules()), unit
        assert all(p.dtype == torch.float32 for p in module.parameters()), unit


@pytest.mark.parametrize("bits, layer", [(4, bnb.nn.Linear4bit), (8, bnb.nn.Linear8bitLt)])
def test_kbit_lora_training_lowers_the_loss(llm_dir, bits, layer):
    model = kbit_vita(llm_dir, bits)
    assert any(isinstance(m, layer) for m in model.llm.modules())
    FreezePolicy({"llm": "lora", "mm_projector": "full"}).apply(model, UNIT_PREFIXES)
    quantized = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = text_batch()
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n].detach(), v) for n, v in quantized.items())  # base weights never move


@pytest.mark.parametrize("bits", [4, 8])
def test_kbit_bf16_keeps_norms_and_head_fp32_and_runs_without_autocast(llm_dir, bits):
    # --bits N --bf16 True: the compute dtype is bf16
    model = build_tiny_vita().to(torch.bfloat16)
    model.llm = AutoModelForCausalLM.from_pretrained(
        llm_dir, dtype=torch.bfloat16, **kbit_load_kwargs(QuantSpec(bits=bits), torch.bfloat16, lora_enabled=True))
    apply_lora(model, lora_spec(), torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.llm.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "norm" in n or "lm_head" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" in n or "embed_tokens" in n)
    FreezePolicy({"llm": "lora"}).apply(model, UNIT_PREFIXES)
    model.train()
    model(**text_batch())["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_4bit_gradients_survive_an_eval_pass(llm_dir):
    # bitsandbytes repacks 4-bit weights for a no-backward CPU kernel on the first eval, no-grad
    # forward (on AVX512-BF16 CPUs); apply_lora turns that off, so training after evaluation still
    # gets every LoRA gradient.
    model = kbit_vita(llm_dir, 4)
    FreezePolicy({"llm": "lora"}).apply(model, UNIT_PREFIXES)
    batch = text_batch()

    def grads():
        model.train()
        model(**batch)["loss"].backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return out

    before = grads()
    model.eval()
    with torch.no_grad():
        model(**batch)
    after = grads()
    assert set(after) == set(before) and len(after) == 2 * len(QWEN2_TARGETS)
    assert all(torch.allclose(after[n], before[n]) for n in before)


def test_quantized_weights_cannot_train_in_full_mode(llm_dir):
    model = kbit_vita(llm_dir, 4)
    with pytest.raises(ValueError) as err:
        FreezePolicy({"llm": "full"}).apply(model, UNIT_PREFIXES)
    assert "--bits" in str(err.value) and "--lora_enable True" in str(err.value)


def test_bits_without_lora_enable_is_refused():
    with pytest.raises(ConfigError) as err:
        parse_args(["--bits", "4"])
    assert "--bits 4" in str(err.value) and "--lora_enable True" in str(err.value)
    with pytest.raises(ValueError, match="--lora_enable True"):
        kbit_load_kwargs(QuantSpec(bits=8), torch.float32, lora_enabled=False)
    parse_args(["--bits", "8", "--lora_enable", "True"])


@pytest.mark.parametrize("flag, value", [("--lora_target_modules", "q_proj"), ("--lora_weight_path", "adapter"),
                                         ("--lora_bias", "all")])
def test_lora_flags_without_lora_enable_are_refused(flag, value):
    with pytest.raises(ConfigError, match=f"{flag} .* without --lora_enable True"):
        parse_args([flag, value])
    parse_args([flag, value, "--lora_enable", "True"])


def test_bad_lora_weight_path(tmp_path):
    for path in (tmp_path / "missing", tmp_path):  # no folder; a folder without adapter weights
        with pytest.raises(FileNotFoundError, match="--lora_weight_path"):
            read_lora_weights(str(path))
        with pytest.raises(FileNotFoundError, match="--lora_weight_path"):  # as a run reads the flag
            start_weights(parse_args(["--lora_enable", "True", "--lora_weight_path", str(path)]))


def test_lora_weight_path_starts_from_a_saved_adapter(tmp_path):
    from vitacore.checkpoint.lora import save_lora_artifacts

    trained = build_tiny_vita()
    apply_lora(trained, lora_spec(), torch.float32)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.normal_()
    save_lora_artifacts(trained, str(tmp_path), "none", is_main=True)

    resumed = build_tiny_vita(seed=1)
    apply_lora(resumed, lora_spec(), torch.float32, weights=read_lora_weights(str(tmp_path)))
    want = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    got = dict(resumed.named_parameters())
    assert all(torch.equal(got[n], p) for n, p in want.items())

    with pytest.raises(ValueError, match="--lora_r"):
        apply_lora(build_tiny_vita(), lora_spec(r=8), torch.float32, weights=read_lora_weights(str(tmp_path)))
    with pytest.raises(ValueError, match="--lora_target_modules"):
        apply_lora(build_tiny_vita(), lora_spec(target_modules="q_proj"), torch.float32,
                   weights=read_lora_weights(str(tmp_path)))


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory, llm_dir):
    """A tokenizer beside the tiny LLM, plus a tower and an audio encoder saved as folders."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vitacore.demo.tokenizer import build_tokenizer, save_tokenizer
    from vitacore.model.audio import AudioEncoder, AudioEncoderConfig

    root = tmp_path_factory.mktemp("paths")
    save_tokenizer(build_tokenizer(vocab_size=300), llm_dir)
    tower = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=16)
    SiglipVisionModel(tower).save_pretrained(root / "tower")
    AudioEncoder(AudioEncoderConfig(num_mel_bins=16, hidden_size=8, num_layers=1, num_heads=2, ffn_size=16)
                 ).save(root / "audio")
    return {"llm": llm_dir, "tower": str(root / "tower"), "audio": str(root / "audio")}


def test_build_model_loads_the_llm_in_4bit_and_wraps_it(model_paths):
    config = parse_args(["--model_name_or_path", model_paths["llm"], "--vision_tower", model_paths["tower"],
                         "--audio_encoder", model_paths["audio"], "--bits", "4", "--lora_enable", "True",
                         "--lora_r", "4", "--lora_bias", "lora_only"])
    bundle, config = build_model_from_config(config)
    model = bundle.model
    assert hasattr(model.llm, "peft_config") and model.llm.peft_config["default"].bias == "lora_only"
    assert adapted_layers(model) == plain_linear_names(build_tiny_vita().llm)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.llm.modules()) == len(QWEN2_TARGETS)
    for unit in ("vision_tower", "mm_projector", "audio_encoder", "audio_adapter"):
        assert not any(isinstance(m, BNB_LAYERS) for m in getattr(model, unit).modules()), unit
    policy = vitacore.policy_from_config(config)
    policy.apply(model, UNIT_PREFIXES)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    biases = {n for n in trained if n.startswith("llm.") and n.endswith("bias")}
    assert {n[: -len(".base_layer.bias")] for n in biases} == {
        f"{WRAPPER}model.layers.0.self_attn.{x}_proj" for x in "qkv"}  # lora_only: the adapted layers with a bias
