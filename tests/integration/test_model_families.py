"""Real LLM families, towers and Whisper, loaded by path: tiny random checkpoints built here, a step each."""

import logging
import os

import pytest
import torch
from tiny_families import LLMS, WHISPER_MEL, save_tiny_llm, save_tiny_whisper
from tiny_models import write_tiny_internvit
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

import vitacore
from vitacore.data.whisper_audio import WhisperAudioTransform
from vitacore.model.audio import AudioEncoder, AudioEncoderConfig
from vitacore.model.whisper import WhisperAudioEncoder
from vitacore.recipes import model_inputs

TOWERS = {
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "internvit": None,  # remote code (trust_remote_code), written by tiny_models.write_tiny_internvit
}
# What --model_type / --version become when omitted (stage 1's Qwen2.5 preset fits only qwen2).
INFERRED = {"qwen2": ("qwen2p5_instruct", "qwen2p5_instruct"), "mistral": ("nemo", "nemo"),
            "mixtral": ("mixtral-8x7b", "mixtral_two"), "llama": ("llama3-8b", "llama3")}
# The pad token each family's tokenizer gets: its own, unk (Mistral), eos (Llama 3: VITA's llama3-8b rule).
PAD = {"qwen2": "<|endoftext|>", "mistral": "<unk>", "mixtral": "<unk>", "llama": "<|eot_id|>"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    paths = {}
    for name in LLMS:  # each with a tokenizer shaped like its family's (special tokens, pad / bos / eos / unk)
        paths[name] = save_tiny_llm(root / name, name)
    for name, classes in TOWERS.items():
        if classes is None:
            paths[name] = write_tiny_internvit(root / name, image_size=64, patch_size=16, hidden_size=16)
            continue
        config_class, model_class = classes
        torch.manual_seed(1)
        config = config_class(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=64, patch_size=16)
        model_class(config).save_pretrained(root / name)
        paths[name] = str(root / name)
    AudioEncoder(AudioEncoderConfig(hidden_size=16, num_layers=1, num_heads=2, ffn_size=32)).save(root / "audio")
    paths["audio"] = str(root / "audio")
    paths["whisper"] = save_tiny_whisper(root / "whisper")
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("tower", sorted(TOWERS))
@pytest.mark.parametrize("llm", sorted(LLMS))
def test_stage1_step_with_each_family_and_tower(checkpoints, dist, vitacore_cache, tmp_path, caplog, llm, tower):
    config = vitacore.parse_args([
        "--stage", "1", "--model_name_or_path", checkpoints[llm], "--vision_tower", checkpoints[tower],
        "--audio_encoder", checkpoints["audio"], "--output_dir", str(tmp_path), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
        "--model_max_length", "256", "--gradient_checkpointing", "False", "--learning_rate", "1e-3",
        *(["--trust_remote_code", "True"] if tower == "internvit" else [])])  # InternViT is remote code
    recipe = vitacore.StageRecipe(config)
    with caplog.at_level(logging.INFO, logger="vitacore"):
        recipe.build_parts()  # the synthetic images, resized for this tower
    bundle, data, config = recipe.bundle, recipe.data, recipe.config
    data.eval = None  # two steps, no evaluation
    model_type, version = INFERRED[llm]
    log = caplog.text
    assert (config.model.model_type, config.model.version, data.train.template.name) == (model_type, version, version)
    assert (f"--model_type {model_type} (stage 1 preset" if llm == "qwen2" else
            f"--model_type not given: {model_type}, inferred from the LLM's config") in log
    assert llm == "qwen2" or f"--version not given: template {version}" in log
    assert bundle.tokenizer.pad_token == PAD[llm] and "attention for the LLM: sdpa (no CUDA device)" in log
    projector_before = {n: p.detach().clone() for n, p in bundle.model.mm_projector.named_parameters()}
    result = recipe.build_trainer().fit()
    assert result.num_steps == 2 and all(r["loss"] > 0 for r in result.rows if "loss" in r)
    assert type(bundle.model.llm).__name__.lower().startswith(llm)
    # InternViT's 2x2 pixel shuffle: the projector takes 4x the tower's width (VITA's mm_hidden_size)
    assert bundle.model.mm_projector[0].in_features == 16 * (4 if tower == "internvit" else 1)
    assert any(not torch.equal(projector_before[n], p) for n, p in bundle.model.mm_projector.named_parameters())
    written = vitacore.save_stage_artifacts(bundle.model, str(tmp_path), set(recipe.policy.trained_units()), True)
    assert set(written) == {"mm_projector.bin"}


def _logits(model, batch):
    model.eval()
    model.loss_chunk_size = 0  # the full-logits path, which returns the logits
    with torch.no_grad():
        return model(**batch)["logits"]


@pytest.mark.slow
def test_stage2_step_with_whisper_then_export_reloads(checkpoints, dist, vitacore_cache, tmp_path, caplog):
    """Qwen2 + SigLIP + Whisper by path: Whisper features, token counts, an adapter step, export and reload."""
    config = vitacore.parse_args([
        "--stage", "2", "--model_name_or_path", checkpoints["qwen2"], "--vision_tower", checkpoints["siglip"],
        "--audio_encoder", checkpoints["whisper"], "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
        "--model_max_length", "256", "--gradient_checkpointing", "False", "--learning_rate", "1e-3"])
    recipe = vitacore.StageRecipe(config)
    with caplog.at_level(logging.INFO, logger="vitacore"):
        recipe.build_parts()  # the synthetic tones
    bundle, data, policy = recipe.bundle, recipe.data, recipe.policy
    data.eval = None  # two steps, no evaluation
    model = bundle.model
    lines = [record.getMessage() for record in caplog.records]
    assert isinstance(model.audio_encoder, WhisperAudioEncoder) and sum("window" in line for line in lines) == 1
    assert set(policy.trained_units()) == {"audio_adapter"}
    assert isinstance(data.train.audio_transform, WhisperAudioTransform)
    batch = data.collator([data.train[i] for i in range(3)])
    assert batch["audios"].shape[-1] == WHISPER_MEL
    with torch.no_grad():
        blocks = model.encode_audio(batch["audios"], batch["audio_lengths"], batch["audio_token_lengths"])
    assert [b.shape[0] for b in blocks] == batch["audio_token_lengths"].tolist()  # what the data predicted

    adapter_before = {n: p.detach().clone() for n, p in model.audio_adapter.named_parameters()}
    encoder_before = {n: p.detach().clone() for n, p in model.audio_encoder.named_parameters()}
    result = recipe.build_trainer().fit()
    assert result.num_steps == 2 and all(r["loss"] > 0 for r in result.rows if "loss" in r)
    assert any(not torch.equal(adapter_before[n], p) for n, p in model.audio_adapter.named_parameters())
    assert all(torch.equal(encoder_before[n], p) for n, p in model.audio_encoder.named_parameters())
    written = vitacore.save_stage_artifacts(model, str(tmp_path / "run"), set(policy.trained_units()), True)
    assert set(written) == {"audio_adpter.bin"}

    export = str(tmp_path / "export")
    vitacore.save_full_export(model, bundle.tokenizer, export, is_main=True, dtype=torch.float32)
    assert sorted(os.listdir(os.path.join(export, "audio_encoder"))) == ["config.json", "preprocessor_config.json"]
    from safetensors import safe_open

    with safe_open(os.path.join(export, "model.safetensors"), "pt") as reader:
        keys = set(reader.keys())
    assert {"model.audio_encoder.encoder.encoder.conv1.weight", "model.audio_encoder.adpter.project.weight"} <= keys
    assert not any("decoder" in key for key in keys)
    reloaded = vitacore.load_full_export(export)
    assert isinstance(reloaded.model.audio_encoder, WhisperAudioEncoder)
    assert isinstance(model_inputs(reloaded.model).audio_transform, WhisperAudioTransform)
    batch.pop("sample_ids")
    assert torch.equal(_logits(reloaded.model, batch), _logits(model, batch))
