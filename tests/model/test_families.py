"""--model_type / --version inference from the LLM's config, the pad token rule, the attention choice."""

import pytest
import torch

from tiny_families import family_tokenizer
from vitacore.config import parse_args
from vitacore.model.families import (
    INFERRED_SOURCE, apply_pad_rule, attention_implementation, resolve_model_type,
)
from vitacore.stages import apply_stage


def resolve(flags, llm_model_type, stage=None):
    config = parse_args(flags + (["--stage", stage] if stage else []))
    if stage:
        apply_stage(config, embedded_default=False)
    lines = []
    resolve_model_type(config, llm_model_type, "/llm", lines.append)
    return config, "\n".join(lines)


@pytest.mark.parametrize("llm, model_type, version", [
    ("qwen2", "qwen2p5_instruct", "qwen2p5_instruct"),
    ("mistral", "nemo", "nemo"),
    ("mixtral", "mixtral-8x7b", "mixtral_two"),
    ("llama", "llama3-8b", "llama3"),
    ("vita-Qwen2", "qwen2p5_instruct", "qwen2p5_instruct"),
    ("vita-fo-Qwen2", "qwen2p5_fo_instruct", "qwen2p5_instruct"),
    ("vita-Mistral", "nemo", "nemo"),
])
def test_omitted_flags_are_inferred_and_said(llm, model_type, version):
    config, log = resolve([], llm)
    assert (config.model.model_type, config.model.version) == (model_type, version)
    assert config.source_of("model_type") == config.source_of("version") == INFERRED_SOURCE
    assert not config.is_explicit("model_type") and not config.is_explicit("version")
    assert f"--model_type not given: {model_type}" in log and f"model_type {llm!r}" in log
    assert f"--version not given: template {version}" in log


def test_a_preset_for_another_family_is_replaced():
    config, log = resolve([], "mistral", stage="1")  # the preset says qwen2p5_instruct / qwen2p5_instruct
    assert (config.model.model_type, config.model.version) == ("nemo", "nemo")
    assert "qwen2p5_instruct is for another family" in log


def test_a_preset_that_fits_is_kept_stage_fo_included():
    config, log = resolve([], "qwen2", stage="fo")
    assert (config.model.model_type, config.model.version) == ("qwen2p5_fo_instruct", "qwen2p5_instruct")
    assert config.source_of("model_type").startswith("stage fo preset") and "fits" in log
    config, _ = resolve([], "qwen2", stage="1")
    assert (config.model.model_type, config.model.version) == ("qwen2p5_instruct", "qwen2p5_instruct")


def test_explicit_values_are_kept():
    config, log = resolve(["--model_type", "nemo"], "qwen2")
    assert (config.model.model_type, config.model.version) == ("nemo", "nemo")  # version follows the type
    assert "note: --model_type nemo is for mistral LLMs" in log
    config, log = resolve(["--version", "plain"], "mistral", stage="1")
    assert (config.model.model_type, config.model.version) == ("nemo", "plain")
    assert "--version not given" not in log


def test_resolving_twice_gives_the_same():
    config, _ = resolve([], "llama", stage="1")
    lines = []
    resolve_model_type(config, "llama", "/llm", lines.append)
    assert (config.model.model_type, config.model.version) == ("llama3-8b", "llama3")


def test_unknown_family_needs_a_version_or_a_model_type():
    with pytest.raises(ValueError) as err:
        resolve([], "gpt2")
    message = str(err.value)
    assert "'gpt2'" in message and "--version" in message and "--model_type" in message and "nemo" in message
    config, log = resolve(["--version", "llama3"], "gpt2", stage="1")
    assert config.model.model_type is None and config.model.version == "llama3" and "generic pad token rule" in log


def test_unknown_model_type_or_version_is_refused_listing_the_known_ones():
    with pytest.raises(ValueError, match="--model_type 'llama3'.*qwen2p5_instruct, qwen2p5_fo_instruct, nemo"):
        resolve(["--model_type", "llama3"], "llama")
    with pytest.raises(ValueError, match="--version 'llama3-8b' is not a known template.*mixtral_two"):
        resolve(["--version", "llama3-8b"], "llama")


def test_pad_rule_unk_then_eos_then_llama3_eos():
    lines = []
    mistral = apply_pad_rule(family_tokenizer("mistral"), "nemo", "/m", lines.append)
    assert mistral.pad_token == "<unk>" and "pad token = unk '<unk>'" in lines[-1]
    llama = apply_pad_rule(family_tokenizer("llama"), None, "/l", lines.append)
    assert llama.pad_token == "<|eot_id|>" and "pad token = eos" in lines[-1]
    qwen = apply_pad_rule(family_tokenizer("qwen2"), "llama3-8b", "/q", lines.append)  # has a pad: llama3 overrides
    assert qwen.pad_token == qwen.eos_token == "<|im_end|>" and "llama3-8b" in lines[-1]
    kept = apply_pad_rule(family_tokenizer("qwen2"), "qwen2p5_instruct", "/q", lines.append)
    assert kept.pad_token == "<|endoftext|>"
    bare = family_tokenizer("llama")
    bare.eos_token = None
    with pytest.raises(ValueError, match="no pad, unk or eos token"):
        apply_pad_rule(bare, None, "/bare", lines.append)


def test_attention_is_sdpa_on_cpu_and_said():
    lines = []
    assert attention_implementation(torch.float32, lines.append) == "sdpa"
    assert lines == ["vitacore: attention for the LLM: sdpa (no CUDA device)"]
