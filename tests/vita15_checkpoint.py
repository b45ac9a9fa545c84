"""Write a tiny full checkpoint in VITA-1.5's released layout, from the documented layout only (never
through vitacore's export writer).

VITA-1.5 saves one ``VITAQwen2ForCausalLM`` with ``save_pretrained``: config.json is Qwen2's config with
``model_type`` ``vita-Qwen2``, ``architectures`` ``["VITAQwen2ForCausalLM"]`` and the multimodal fields
VITA's train.py sets (VITA_REFERENCE §8), the encoder paths as they were on the training machine (so
they do not exist here); the weights are sharded safetensors (``model-0000k-of-0000n.safetensors`` and
``model.safetensors.index.json``) holding the LLM under its own names and every other part under
``model.``: ``model.vision_tower.vision_tower.*`` (InternViT's own keys), ``model.mm_projector.{0,2}.*``
(mlp2x_gelu), ``model.audio_encoder.encoder.*`` and ``model.audio_encoder.adpter.*`` (``final.pt``'s keys,
persistent buffers included), ``model.audio_encoder.prompt_embeddings.weight`` and ``predictor_head.*``.
"""

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

# The paths recorded in VITA-1.5's released config.json (relative names of the training machine's folders).
RECORDED_TOWER = "InternViT-300M-448px"
RECORDED_AUDIO = "audio-encoder-Qwen2-7B-1107-weight-base-11wh-tunning"
PIXEL_SHUFFLE = 4  # VITA's InternViT tower: the projector reads 4x the tower's width
_LLM_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def _config(llm_dir, tower_dir, prompt_num):
    with open(os.path.join(llm_dir, "config.json")) as fh:
        config = json.load(fh)
    with open(os.path.join(tower_dir, "config.json")) as fh:
        tower_hidden = json.load(fh)["hidden_size"]
    config.update({
        "architectures": ["VITAQwen2ForCausalLM"], "model_type": "vita-Qwen2",
        "mm_vision_tower": RECORDED_TOWER, "mm_audio_encoder": RECORDED_AUDIO,
        "mm_hidden_size": PIXEL_SHUFFLE * tower_hidden, "mm_projector_type": "mlp2x_gelu", "mm_projector_lr": None,
        "use_mm_proj": True, "image_aspect_ratio": "square", "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 6200, "freeze_audio_encoder": True, "freeze_audio_encoder_adapter": True,
        "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "tune_audio_mlp_adapter": False,
        "audio_prompt_finetune": bool(prompt_num), "audio_prompt_num": prompt_num or None,
        "audio_state_predictor_tuning": False, "unfreeze_vision_tower": False, "use_s2": False, "use_cache": True,
        "torch_dtype": "float32",
    })
    return config


def write_vita15_checkpoint(folder, llm_dir, tower_dir, whale_dir, prompt_num=4, num_shards=2, seed=0):
    """Compose a VITA-1.5-layout checkpoint from an LLM folder, an InternViT folder and a VITA audio folder.

    Args:
        folder: where to write.
        llm_dir: a Qwen2 folder (config.json, model.safetensors, tokenizer files).
        tower_dir: an InternViT folder (model.safetensors with InternVisionModel's keys).
        whale_dir: a VITA audio-encoder folder (its final.pt's ``encoder.*`` / ``adpter.*`` keys).
        prompt_num: rows of the audio prompt embeddings (0: none).
        num_shards: safetensors files to spread the tensors over.
        seed: seeds the projector, prompts and predictor head.

    Returns:
        ``{VITA key: shape}`` of every tensor written.
    """
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    config = _config(llm_dir, tower_dir, prompt_num)
    hidden, mm_hidden = config["hidden_size"], config["mm_hidden_size"]
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return 0.02 * torch.randn(*shape, generator=generator)

    state = dict(load_file(os.path.join(llm_dir, "model.safetensors")))
    state.update({f"model.vision_tower.vision_tower.{k}": v.float()
                  for k, v in load_file(os.path.join(tower_dir, "model.safetensors")).items()})
    state.update({"model.mm_projector.0.weight": rand(hidden, mm_hidden), "model.mm_projector.0.bias": rand(hidden),
                  "model.mm_projector.2.weight": rand(hidden, hidden), "model.mm_projector.2.bias": rand(hidden)})
    audio = torch.load(os.path.join(whale_dir, "final.pt"), map_location="cpu", weights_only=True)
    state.update({f"model.audio_encoder.{k}": v for k, v in audio.items()})
    if prompt_num:
        state["model.audio_encoder.prompt_embeddings.weight"] = rand(prompt_num, hidden)
    state.update({"predictor_head.weight": rand(3, hidden), "predictor_head.bias": rand(3)})

    keys = sorted(state)
    names = [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    weight_map = {key: names[i * num_shards // len(keys)] for i, key in enumerate(keys)}
    for name in names:
        save_file({k: state[k].contiguous() for k in keys if weight_map[k] == name}, os.path.join(folder, name),
                  metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    for name in os.listdir(llm_dir):  # tokenizer files and generation_config.json
        if name not in _LLM_FILES and os.path.isfile(os.path.join(llm_dir, name)):
            shutil.copyfile(os.path.join(llm_dir, name), os.path.join(folder, name))
    return {key: tuple(value.shape) for key, value in state.items()}
