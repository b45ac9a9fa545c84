"""LoRA artifacts: peft's adapter folder, ``non_lora_trainables.bin`` in VITA's key layout, merging."""

import json
import os

import pytest
import torch
import torch.nn as nn
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import TINY, build_tiny_vita
from transformers import AutoModelForCausalLM

from vitacore.checkpoint import (
    load_non_lora_trainables,
    lora_state_dict,
    merge_lora,
    non_lora_trainables,
    save_lora_artifacts,
)
from vitacore.freeze import FreezePolicy
from vitacore.model import UNIT_PREFIXES, LoraSpec, QuantSpec, apply_lora
from vitacore.model.lora import disable_bnb_cpu_repacking, kbit_load_kwargs

FILES = {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin"}


def lora_spec(bias="none"):
    """``--lora_enable True --lora_r 4 --lora_alpha 8 --lora_dropout 0 --lora_bias BIAS``."""
    return LoraSpec(r=4, alpha=8, dropout=0.0, bias=bias)


def kbit_kwargs(**quant):
    """``from_pretrained`` arguments for ``--bits ...`` with LoRA on, in float32 (no --bf16 / --fp16)."""
    return kbit_load_kwargs(QuantSpec(**quant), torch.float32, lora_enabled=True)


def trained_vita(lora_bias="none", llm=None, seed=0, trainable_regex=None):
    """A LoRA vita whose adapters, biases and projector moved away from their initial values."""
    model = build_tiny_vita(seed=seed)
    if llm is not None:
        model.llm = llm
    apply_lora(model, lora_spec(lora_bias), torch.float32)
    FreezePolicy({"llm": "lora", "mm_projector": "full", "audio_adapter": "full"}, lora_bias=lora_bias,
                 trainable_regex=trainable_regex).apply(model, UNIT_PREFIXES)
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # lora_B starts at zero: make the adapter do something
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def expected_adapter_keys(lora_bias):
    """peft's file keys, built from the plain LLM's layers (independently of the code under test)."""
    plain = build_tiny_vita().llm
    linear = {n: m for n, m in plain.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    keys = {f"base_model.model.{n}.lora_{ab}.weight" for n in linear for ab in "AB"}
    for name, _ in plain.named_parameters():
        if not name.endswith(".bias"):
            continue
        layer = name[: -len(".bias")]
        if lora_bias == "all":
            keys.add(f"base_model.model.{layer}.base_layer.bias" if layer in linear else f"base_model.model.{name}")
        elif lora_bias == "lora_only" and layer in linear:
            keys.add(f"base_model.model.{layer}.base_layer.bias")
    return keys


def text_ids(seed=0):
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(llm, ids):
    llm.eval()
    with torch.no_grad():
        return llm(input_ids=ids).logits


@pytest.mark.parametrize("lora_bias", ["none", "all", "lora_only"])
def test_lora_state_dict_holds_exactly_the_adapter_tensors(lora_bias):
    model = trained_vita(lora_bias)
    state = lora_state_dict(model, lora_bias)
    expected = expected_adapter_keys(lora_bias)
    assert set(state) == expected
    # What the policy trains in the LLM is exactly what the adapter file carries.
    trained_llm = {n[len("llm."):].replace(".default.", ".") for n, p in model.named_parameters()
                   if p.requires_grad and n.startswith("llm.")}
    assert trained_llm == expected
    if lora_bias == "none":
        assert len(expected) == 2 * 7  # q/k/v/o/gate/up/down
    if lora_bias == "lora_only":  # Qwen2 has biases on q/k/v only
        assert sorted(k for k in expected if k.endswith("bias")) == [
            f"base_model.model.model.layers.0.self_attn.{x}_proj.base_layer.bias" for x in "kqv"]


@pytest.mark.parametrize("lora_bias", ["none", "all", "lora_only"])
def test_peft_from_pretrained_reproduces_the_trained_llm(tmp_path, lora_bias):
    model = trained_vita(lora_bias)
    written = save_lora_artifacts(model, str(tmp_path), lora_bias, is_main=True)
    assert set(written) == FILES and all(os.path.isfile(p) for p in written.values())
    assert set(os.listdir(tmp_path)) == FILES  # no temporary files left behind
    assert set(load_file(written["adapter_model.safetensors"])) == expected_adapter_keys(lora_bias)
    with open(written["adapter_config.json"]) as fh:
        config = json.load(fh)
    assert config["bias"] == lora_bias and config["r"] == 4 and config["peft_type"] == "LORA"

    reloaded = PeftModel.from_pretrained(build_tiny_vita(seed=0).llm, str(tmp_path))
    ids = text_ids()
    assert torch.allclose(logits(reloaded, ids), logits(model.llm, ids), atol=1e-5, rtol=0)
    # A changed adapter changes the logits: the comparison above is not vacuous.
    assert not torch.allclose(logits(build_tiny_vita(seed=0).llm, ids), logits(model.llm, ids), atol=1e-3)


def test_4bit_adapter_round_trip(tmp_path):
    llm_dir = str(tmp_path / "llm")
    build_tiny_vita().llm.save_pretrained(llm_dir)
    kwargs = kbit_kwargs(bits=4, quant_type="nf4")

    def load_4bit():
        return AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32, **kwargs)

    model = trained_vita("none", llm=load_4bit())
    save_lora_artifacts(model, str(tmp_path / "out"), "none", is_main=True)
    base = load_4bit()
    disable_bnb_cpu_repacking(base)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "out"))
    ids = text_ids()
    assert torch.allclose(logits(reloaded, ids), logits(model.llm, ids), atol=1e-3, rtol=0)


def vita_loader_key(key):
    """VITA's builder: strip ``base_model.``, then ``model.`` when the key starts ``model.model.``."""
    key = key[len("base_model."):]
    return key[len("model."):] if key.startswith("model.model.") else key


def test_non_lora_trainables_use_vita_names(tmp_path):
    model = trained_vita("all")
    state = non_lora_trainables(model, "all")
    projector = {f"base_model.model.model.mm_projector.{n}" for n, _ in model.mm_projector.named_parameters()}
    adapter = {f"base_model.model.model.audio_encoder.adpter.{n}" for n, _ in model.audio_adapter.named_parameters()}
    assert set(state) == projector | adapter  # the LLM's biases are in the adapter file, not here too
    assert "base_model.model.model.mm_projector.0.weight" in state
    assert vita_loader_key("base_model.model.model.mm_projector.0.weight") == "model.mm_projector.0.weight"
    assert {vita_loader_key(k) for k in projector} == {f"model.mm_projector.{n}" for n, _ in
                                                       model.mm_projector.named_parameters()}
    assert torch.equal(state["base_model.model.model.mm_projector.0.weight"], model.mm_projector[0].weight)


def test_non_lora_trainables_round_trip(tmp_path):
    # lm_head trained by regex: an LLM key, which VITA's rule does not turn into a model.model.* name.
    model = trained_vita("none", trainable_regex=r"lm_head")
    written = save_lora_artifacts(model, str(tmp_path), "none", is_main=True)
    saved = torch.load(written["non_lora_trainables.bin"], weights_only=True)
    assert "base_model.model.lm_head.weight" in saved

    fresh = build_tiny_vita(seed=3)
    apply_lora(fresh, lora_spec(), torch.float32)
    loaded = load_non_lora_trainables(written["non_lora_trainables.bin"], fresh)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    assert loaded == trainable
    params = dict(fresh.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in model.named_parameters() if n in trainable)


def test_load_non_lora_trainables_is_strict(tmp_path):
    model = build_tiny_vita()
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_non_lora_trainables(str(tmp_path / "missing.bin"), model)
    path = str(tmp_path / "non_lora_trainables.bin")
    torch.save({"base_model.model.model.mm_projector.9.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="non_lora_trainables.bin.*fit no parameter"):
        load_non_lora_trainables(path, model)
    torch.save({"base_model.model.model.mm_projector.0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="shapes differ"):
        load_non_lora_trainables(path, model)
    # VITA's own names (what its builder produces) load as well.
    weight = torch.randn_like(model.mm_projector[0].weight)
    torch.save({"model.mm_projector.0.weight": weight}, path)
    assert load_non_lora_trainables(path, model) == ["mm_projector.0.weight"]
    assert torch.equal(model.mm_projector[0].weight, weight)


def test_only_the_main_rank_writes(tmp_path):
    written = save_lora_artifacts(trained_vita(), str(tmp_path / "out"), "none", is_main=False)
    assert set(written) == FILES and not os.path.exists(tmp_path / "out")


def test_merge_lora_gives_a_plain_llm_with_the_same_logits():
    model = trained_vita("all")
    ids = text_ids()
    before = logits(model.llm, ids)
    merge_lora(model)
    assert type(model.llm).__name__ == "Qwen2ForCausalLM"
    assert not any("lora_" in n or "base_layer" in n for n, _ in model.named_parameters())
    assert torch.allclose(logits(model.llm, ids), before, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(model)


def test_merge_lora_refuses_a_quantized_base(tmp_path):
    build_tiny_vita().llm.save_pretrained(tmp_path)
    llm = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                               **kbit_kwargs(bits=4))
    model = trained_vita("none", llm=llm)
    with pytest.raises(ValueError, match="--bits 16"):
        merge_lora(model)


@pytest.mark.slow
def test_artifacts_and_kbit_training_under_zero3_on_two_ranks(tmp_path):
    """Gathering is collective: both ranks save, rank 0 writes full tensors equal to the unpartitioned ones;
    build_model loads a 4- and an 8-bit LLM under ZeRO-3 and LoRA trains."""
    import socket
    import subprocess
    import sys

    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vitacore.demo.tokenizer import build_tokenizer, save_tokenizer
    from vitacore.model.audio import AudioEncoder, AudioEncoderConfig

    paths = {"llm": str(tmp_path / "llm"), "tower": str(tmp_path / "tower"), "audio": str(tmp_path / "audio")}
    build_tiny_vita().llm.save_pretrained(paths["llm"])
    save_tokenizer(build_tokenizer(vocab_size=300), paths["llm"])
    tower = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=16)
    SiglipVisionModel(tower).save_pretrained(paths["tower"])
    AudioEncoder(AudioEncoderConfig(num_mel_bins=16, hidden_size=8, num_layers=1, num_heads=2, ffn_size=16)
                 ).save(paths["audio"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    driver = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lora_zero3_driver.py")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(port), driver,
                             str(tmp_path / "out"), json.dumps(paths)],
                            capture_output=True, text=True, env=env, cwd=repo, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "OK 0" in result.stdout and "OK 1" in result.stdout
