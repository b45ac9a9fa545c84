"""Real LLM families and towers, loaded by path: tiny random checkpoints built here, one stage-1 step each."""

import pytest
import torch
from transformers import (
    CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel,
)

import vitacore
from vitacore.data.tokenizer import build_tokenizer, save_tokenizer
from vitacore.model.audio import AudioEncoder, AudioEncoderConfig

LLMS = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
    "mixtral": (MixtralConfig, MixtralForCausalLM, {"num_local_experts": 2, "num_experts_per_tok": 1}),
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
}
TOWERS = {
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
    "clip": (CLIPVisionConfig, CLIPVisionModel),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    tokenizer = build_tokenizer()
    paths = {}
    for name, (config_class, model_class, extra) in LLMS.items():
        torch.manual_seed(0)
        config = config_class(vocab_size=len(tokenizer) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              pad_token_id=tokenizer.pad_token_id, **extra)
        path = root / name
        model_class(config).save_pretrained(path)
        save_tokenizer(tokenizer, path)
        paths[name] = str(path)
    for name, (config_class, model_class) in TOWERS.items():
        torch.manual_seed(1)
        config = config_class(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=64, patch_size=16)
        model_class(config).save_pretrained(root / name)
        paths[name] = str(root / name)
    AudioEncoder(AudioEncoderConfig(hidden_size=16, num_layers=1, num_heads=2, ffn_size=32)).save(root / "audio")
    paths["audio"] = str(root / "audio")
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("tower", sorted(TOWERS))
@pytest.mark.parametrize("llm", sorted(LLMS))
def test_stage1_step_with_each_family_and_tower(checkpoints, dist, vitacore_cache, tmp_path, llm, tower):
    config = vitacore.parse_args([
        "--model_name_or_path", checkpoints[llm], "--vision_tower", checkpoints[tower],
        "--audio_encoder", checkpoints["audio"], "--output_dir", str(tmp_path), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
        "--model_max_length", "256", "--gradient_checkpointing", "False"])
    stage = vitacore.apply_stage(config, embedded_default=False)
    bundle = vitacore.build_model(config, log=lambda *a: None)
    policy = vitacore.policy_from_config(config)
    policy.apply(bundle.model, vitacore.UNIT_PREFIXES)
    groups = vitacore.build_param_groups(bundle.model, vitacore.UNIT_PREFIXES, 1e-3, 0.0)
    data = vitacore.build_data(config, bundle, stage.demo_data)  # the synthetic images, resized for this tower
    projector_before = {n: p.detach().clone() for n, p in bundle.model.mm_projector.named_parameters()}
    result = vitacore.Trainer(config, bundle.model, groups, data.train, data.collator, dist).fit()
    assert result.num_steps == 2 and all(r["loss"] > 0 for r in result.rows if "loss" in r)
    assert type(bundle.model.llm).__name__.lower().startswith(llm)
    assert any(not torch.equal(projector_before[n], p) for n, p in bundle.model.mm_projector.named_parameters())
    written = vitacore.save_stage_artifacts(bundle.model, str(tmp_path), set(policy.trained_units()), True)
    assert set(written) == {"mm_projector.bin"}
