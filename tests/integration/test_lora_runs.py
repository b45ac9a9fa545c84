"""LoRA and QLoRA runs end to end: stage 4 on the embedded default, PEFT reload, merge-lora, ZeRO-3."""

import json
import os
import sys

import pytest
import torch

import vitacore
from vitacore.checkpoint import latest_checkpoint
from vitacore.checkpoint.export import load_full_export
from vitacore.recipes import build_model_from_config
from vitacore.recipes.tools import merge_lora_folder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

from test_distributed import driver_run  # noqa: E402

pytestmark = pytest.mark.slow


def train_in_process(flags, dist):
    """The example's flow, in this process: returns the bundle, the result, the model spec and the trained units."""
    recipe = vitacore.StageRecipe(vitacore.parse_args(flags))
    recipe.build_parts()
    recipe.data.eval = None  # training and the saved artifacts are what is checked
    result = recipe.build_trainer().fit()
    return recipe.bundle, result, recipe.specs.model, set(recipe.policy.trained_units())


def llm_logits(llm, ids):
    llm.eval()
    with torch.no_grad():
        return llm(input_ids=ids).logits.float()


@pytest.mark.parametrize("bits, tolerance", [(16, 1e-5), (4, 1e-3)])
def test_stage4_lora_trains_saves_and_peft_reproduces_it(vitacore_cache, dist, tmp_path, monkeypatch, bits,
                                                          tolerance):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from vitacore.demo.embedded import ensure_default_assets
    from vitacore.model.lora import disable_bnb_cpu_repacking, kbit_load_kwargs

    monkeypatch.chdir(tmp_path)  # no earlier demo output is picked up
    out = tmp_path / "run"
    bundle, result, spec, trained = train_in_process(
        ["--stage", "4", "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--bits", str(bits),
         "--max_steps", "40", "--logging_steps", "5", "--learning_rate", "1e-3", "--output_dir", str(out)], dist)
    assert trained == {"llm", "mm_projector"}
    losses = [row["loss"] for row in result.rows if "loss" in row]
    print(f"bits {bits}: logged losses {losses[0]:.4f} -> {losses[-1]:.4f} over {result.num_steps} steps")
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses  # it learns
    names = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or n.startswith("mm_projector.") for n in names)

    checkpoint = latest_checkpoint(str(out))
    for artifact in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin"):
        assert os.path.exists(os.path.join(checkpoint, artifact)), artifact
    non_lora = torch.load(os.path.join(checkpoint, "non_lora_trainables.bin"), weights_only=True)
    assert set(non_lora) == {f"base_model.model.model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}

    base_path = ensure_default_assets().llm
    base = AutoModelForCausalLM.from_pretrained(base_path, **kbit_load_kwargs(spec.quant, spec.dtype, True))
    # bitsandbytes' eval-only CPU kernel (AVX512-BF16) rounds through bf16 (logits move by ~0.04);
    # compare the same 4-bit arithmetic the run used.
    disable_bnb_cpu_repacking(base)
    reloaded = PeftModel.from_pretrained(base, checkpoint)
    ids = torch.randint(3, bundle.model.llm.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = llm_logits(bundle.model.llm, ids)
    difference = (llm_logits(reloaded, ids) - expected).abs().max().item()
    print(f"bits {bits}: PeftModel.from_pretrained vs trained, max |logit difference| {difference:.3g}")
    assert difference <= tolerance
    if bits == 16:
        # merge-lora: the merged export loads with plain from_pretrained and matches the LoRA model.
        merged = tmp_path / "merged"
        merge_lora_folder(checkpoint, str(merged), torch.float32)
        plain = AutoModelForCausalLM.from_pretrained(merged)
        assert not hasattr(plain, "peft_config")
        difference = (llm_logits(plain, ids) - expected).abs().max().item()
        scale = max(1.0, expected.abs().max().item())
        print(f"merge-lora export vs LoRA model, max |logit difference| {difference:.3g} (logits up to {scale:.3g})")
        # Folding B·A into W rounds once per weight in fp32: equal up to float32 rounding, relative to the logits.
        assert difference <= 1e-5 * scale
        full = load_full_export(str(merged)).model
        assert torch.equal(full.mm_projector[0].weight, bundle.model.mm_projector[0].weight.detach())


def test_lora_with_full_projector_under_two_process_zero3(vitacore_cache, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from vitacore.checkpoint.lora import load_non_lora_trainables
    from vitacore.demo.embedded import ensure_default_assets

    dumps = driver_run(vitacore_cache, tmp_path, 2, "--stage", "4", "--lora_enable", "True", "--lora_r", "8",
                       "--deepspeed", os.path.join(REPO, "configs", "zero3.json"), "--per_device_train_batch_size",
                       "4", "--learning_rate", "1e-3", "--dump_changes")
    for dump in dumps:
        trainable = set(dump["trainable"])
        assert trainable and all("lora_" in n or n.startswith("mm_projector.") for n in trainable)
        assert any("lora_" in n for n in trainable) and any(n.startswith("mm_projector.") for n in trainable)
        assert set(dump["changed"]) == trainable  # both kinds changed, and nothing else did
    trained = torch.load(str(tmp_path / "dump2.trained.pt"), weights_only=True)
    out = tmp_path / "o2"
    # The artifacts reload: the adapter onto the base LLM, the projector through VITA's names.
    base = AutoModelForCausalLM.from_pretrained(ensure_default_assets().llm)
    peft_llm = PeftModel.from_pretrained(base, str(out))
    for name, param in peft_llm.named_parameters():
        if "lora_" in name:
            assert torch.equal(param.detach(), trained["llm." + name]), name
    config = vitacore.parse_args(["--stage", "4", "--output_dir", str(tmp_path / "fresh")])
    _, config = vitacore.resolve_stage(config, embedded_default=True)
    model = build_model_from_config(config)[0].model
    load_non_lora_trainables(str(out / "non_lora_trainables.bin"), model)
    for name, param in model.mm_projector.named_parameters():
        assert torch.equal(param.detach(), trained["mm_projector." + name]), name
    assert json.load(open(out / "adapter_config.json"))["r"] == 8


@pytest.mark.gpu
def test_qlora_stage4_in_bf16_on_a_gpu(vitacore_cache, dist, tmp_path, monkeypatch):
    """The GPU recipe: 4-bit NF4 base, bf16 compute, LoRA on the LLM, projector in full."""
    monkeypatch.chdir(tmp_path)
    bundle, result, spec, trained = train_in_process(
        ["--stage", "4", "--lora_enable", "True", "--lora_r", "8", "--bits", "4", "--bf16", "True",
         "--max_steps", "40", "--logging_steps", "5", "--learning_rate", "1e-3", "--output_dir", str(tmp_path / "run")],
        dist)
    losses = [row["loss"] for row in result.rows if "loss" in row]
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    assert os.path.exists(os.path.join(latest_checkpoint(str(tmp_path / "run")), "adapter_model.safetensors"))
