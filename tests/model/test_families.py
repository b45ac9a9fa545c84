"""--model_type / --version inference from the LLM's config, the pad token rule, the attention choice."""

import pytest
import torch
from tiny_families import family_tokenizer

from vitacore.config import parse_args
from vitacore.model import INFERRED_SOURCE, ModelTypeChoice, infer_model_type
from vitacore.model.families import apply_pad_rule, attention_implementation
from vitacore.recipes import resolve_stage, with_model_type


@pytest.fixture
def resolve(vitacore_log):
    """``resolve(flags, llm_model_type, stage=None) -> (resolved config, log text of this call)``.

    The config is parsed from ``flags`` (with ``--stage``'s preset applied), then resolved for an LLM of
    config type ``llm_model_type`` at ``/llm`` by :func:`vitacore.recipes.with_model_type`; the
    parsed config itself is left as it was.
    """
    def run(flags, llm_model_type, stage=None):
        config = parse_args(flags + (["--stage", stage] if stage else []))
        if stage:
            _, config = resolve_stage(config, embedded_default=False)
        before = (config.model.model_type, config.model.version, dict(config.field_sources))
        vitacore_log.clear()
        resolved = with_model_type(config, llm_model_type, "/llm")
        assert (config.model.model_type, config.model.version, dict(config.field_sources)) == before
        return resolved, vitacore_log.text

    return run


@pytest.mark.parametrize("llm, model_type, version", [
    ("qwen2", "qwen2p5_instruct", "qwen2p5_instruct"),
    ("mistral", "nemo", "nemo"),
    ("mixtral", "mixtral-8x7b", "mixtral_two"),
    ("llama", "llama3-8b", "llama3"),
    ("vita-Qwen2", "qwen2p5_instruct", "qwen2p5_instruct"),
    ("vita-fo-Qwen2", "qwen2p5_fo_instruct", "qwen2p5_instruct"),
    ("vita-Mistral", "nemo", "nemo"),
])
def test_omitted_flags_are_inferred_and_said(resolve, llm, model_type, version):
    config, log = resolve([], llm)
    assert (config.model.model_type, config.model.version) == (model_type, version)
    assert config.source_of("model_type") == config.source_of("version") == INFERRED_SOURCE
    assert not config.is_explicit("model_type") and not config.is_explicit("version")
    assert f"--model_type not given: {model_type}" in log and f"model_type {llm!r}" in log
    assert f"--version not given: template {version}" in log


def test_a_preset_for_another_family_is_replaced(resolve):
    config, log = resolve([], "mistral", stage="1")  # the preset says qwen2p5_instruct / qwen2p5_instruct
    assert (config.model.model_type, config.model.version) == ("nemo", "nemo")
    assert "qwen2p5_instruct is for another family" in log


def test_a_preset_that_fits_is_kept_stage_fo_included(resolve):
    config, log = resolve([], "qwen2", stage="fo")
    assert (config.model.model_type, config.model.version) == ("qwen2p5_fo_instruct", "qwen2p5_instruct")
    assert config.source_of("model_type").startswith("stage fo preset") and "fits" in log
    config, _ = resolve([], "qwen2", stage="1")
    assert (config.model.model_type, config.model.version) == ("qwen2p5_instruct", "qwen2p5_instruct")


def test_explicit_values_are_kept(resolve):
    config, log = resolve(["--model_type", "nemo"], "qwen2")
    assert (config.model.model_type, config.model.version) == ("nemo", "nemo")  # version follows the type
    assert "note: --model_type nemo is for mistral LLMs" in log
    config, log = resolve(["--version", "plain"], "mistral", stage="1")
    assert (config.model.model_type, config.model.version) == ("nemo", "plain")
    assert "--version not given" not in log


def test_resolving_twice_gives_the_same(resolve):
    config, _ = resolve([], "llama", stage="1")
    config = with_model_type(config, "llama", "/llm")
    assert (config.model.model_type, config.model.version) == ("llama3-8b", "llama3")


def test_unknown_family_needs_a_version_or_a_model_type(resolve):
    with pytest.raises(ValueError) as err:
        resolve([], "gpt2")
    message = str(err.value)
    assert "'gpt2'" in message and "--version" in message and "--model_type" in message and "nemo" in message
    config, log = resolve(["--version", "llama3"], "gpt2", stage="1")
    assert config.model.model_type is None and config.model.version == "llama3" and "generic pad token rule" in log


def test_unknown_model_type_or_version_is_refused_listing_the_known_ones(resolve):
    with pytest.raises(ValueError, match="--model_type 'llama3'.*qwen2p5_instruct, qwen2p5_fo_instruct, nemo"):
        resolve(["--model_type", "llama3"], "llama")
    with pytest.raises(ValueError, match="--version 'llama3-8b' is not a known template.*mixtral_two"):
        resolve(["--version", "llama3-8b"], "llama")


def test_pad_rule_unk_then_eos_then_llama3_eos(vitacore_log):
    mistral = apply_pad_rule(family_tokenizer("mistral"), "nemo", "/m")
    assert mistral.pad_token == "<unk>" and "pad token = unk '<unk>'" in vitacore_log.lines[-1]
    llama = apply_pad_rule(family_tokenizer("llama"), None, "/l")
    assert llama.pad_token == "<|eot_id|>" and "pad token = eos" in vitacore_log.lines[-1]
    qwen = apply_pad_rule(family_tokenizer("qwen2"), "llama3-8b", "/q")  # has a pad: llama3 overrides
    assert qwen.pad_token == qwen.eos_token == "<|im_end|>" and "llama3-8b" in vitacore_log.lines[-1]
    kept = apply_pad_rule(family_tokenizer("qwen2"), "qwen2p5_instruct", "/q")
    assert kept.pad_token == "<|endoftext|>"
    bare = family_tokenizer("llama")
    bare.eos_token = None
    with pytest.raises(ValueError, match="no pad, unk or eos token"):
        apply_pad_rule(bare, None, "/bare")


def test_attention_is_sdpa_on_cpu_and_said(vitacore_log):
    assert attention_implementation(torch.float32) == "sdpa"
    assert vitacore_log.lines == ["vitacore: attention for the LLM: sdpa (no CUDA device)"]


# infer_model_type itself: a pure function of the LLM's type and the run's current values.
PRESET = "stage 1 preset (stage1.sh)"


@pytest.mark.parametrize("llm, current, explicit, want", [
    # (llm config type, (model_type, version), (model_type explicit, version explicit), ModelTypeChoice)
    ("qwen2", (None, None), (False, False), ("qwen2p5_instruct", "qwen2p5_instruct", ("model_type", "version"))),
    ("vita-fo-Qwen2", (None, None), (False, False),
     ("qwen2p5_fo_instruct", "qwen2p5_instruct", ("model_type", "version"))),
    ("mixtral", (None, None), (False, False), ("mixtral-8x7b", "mixtral_two", ("model_type", "version"))),
    # a preset's type of the LLM's family is kept, with the preset's template
    ("qwen2", ("qwen2p5_fo_instruct", "qwen2p5_instruct"), (False, False),
     ("qwen2p5_fo_instruct", "qwen2p5_instruct", ())),
    # ... and without a template of its own, the type's default one
    ("qwen2", ("qwen2p5_fo_instruct", None), (False, False), ("qwen2p5_fo_instruct", "qwen2p5_instruct", ("version",))),
    # a preset's type of another family is replaced, its template too
    ("mistral", ("qwen2p5_instruct", "qwen2p5_instruct"), (False, False), ("nemo", "nemo", ("model_type", "version"))),
    # the user's type is kept even for another family; the template follows it
    ("qwen2", ("nemo", None), (True, False), ("nemo", "nemo", ("version",))),
    # the user's template is kept
    ("mistral", ("qwen2p5_instruct", "plain"), (False, True), ("nemo", "plain", ("model_type",))),
    # another family with a template: no model type
    ("gpt2", (None, "llama3"), (False, True), (None, "llama3", ("model_type",))),
])
def test_infer_model_type_rules(llm, current, explicit, want):
    choice = infer_model_type(llm, "/llm", current[0], current[1], explicit[0], explicit[1], PRESET)
    assert choice == ModelTypeChoice(*want)


def test_infer_model_type_says_what_it_decided(vitacore_log):
    infer_model_type("mistral", "/llm", "qwen2p5_instruct", "qwen2p5_instruct", False, False, PRESET)
    assert vitacore_log.lines == [
        "vitacore: --model_type not given: nemo, inferred from the LLM's config ('/llm': model_type 'mistral'); "
        f"the {PRESET} value qwen2p5_instruct is for another family",
        "vitacore: --version not given: template nemo, the default for --model_type nemo",
    ]
    vitacore_log.clear()
    infer_model_type("qwen2", "/llm", "qwen2p5_fo_instruct", "qwen2p5_instruct", False, False, PRESET)
    assert vitacore_log.lines == [f"vitacore: --model_type qwen2p5_fo_instruct ({PRESET}) fits the LLM's config "
                                  "('/llm': model_type 'qwen2')"]


def test_infer_model_type_refusals():
    with pytest.raises(ValueError) as err:
        infer_model_type("gpt2", "/llm", None, None, False, False)
    message = str(err.value)
    assert "'gpt2'" in message and "--version" in message and "--model_type" in message and "nemo" in message
    with pytest.raises(ValueError, match="--model_type 'llama3'.*qwen2p5_instruct, qwen2p5_fo_instruct, nemo"):
        infer_model_type("llama", "/llm", "llama3", None, True, False)
