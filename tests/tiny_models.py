"""Tiny random parts composed into a VitaModel, shared by tests of several packages."""

import json
import os
import shutil

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from vitacore.data.images import ImageSpec
from vitacore.model.audio import AudioAdapter, AudioEncoder, AudioEncoderConfig
from vitacore.model.multimodal import VitaModel
from vitacore.model.projector import build_projector
from vitacore.model.vision import SIGLIP_MEAN, SIGLIP_STD, VisionTower

TINY = {
    "vocab_size": 64,
    "llm_hidden": 32,
    "vision_hidden": 16,
    "image_size": 32,
    "patch_size": 16,
    "mel": 16,
    "audio_hidden": 8,
}


def build_tiny_vita(seed: int = 0, model_max_length: int = 128, padding_side: str = "right",
                    audio_prompt_num: int = 0, state_head: bool = False) -> VitaModel:
    """All seven units when asked (``audio_prompt_num`` > 0, ``state_head``); random weights from ``seed``."""
    torch.manual_seed(seed)
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=TINY["vocab_size"], hidden_size=TINY["llm_hidden"], intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    ))
    siglip = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=TINY["vision_hidden"], intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=TINY["image_size"], patch_size=TINY["patch_size"], attention_dropout=0.1,
    ))
    tower = VisionTower(siglip, -2, False, ImageSpec(TINY["image_size"], SIGLIP_MEAN, SIGLIP_STD), "tiny")
    projector = build_projector("mlp2x_gelu", TINY["vision_hidden"], TINY["llm_hidden"])
    encoder = AudioEncoder(AudioEncoderConfig(num_mel_bins=TINY["mel"], hidden_size=TINY["audio_hidden"],
                                              num_layers=1, num_heads=2, ffn_size=16, dropout=0.1))
    adapter = AudioAdapter(TINY["audio_hidden"], TINY["llm_hidden"])
    prompt = torch.nn.Embedding(audio_prompt_num, TINY["llm_hidden"]) if audio_prompt_num else None
    head = torch.nn.Linear(TINY["llm_hidden"], 3) if state_head else None
    return VitaModel(llm, tower, projector, encoder, adapter, prompt, head, model_max_length=model_max_length,
                     padding_side=padding_side, mm_config={"mm_projector_type": "mlp2x_gelu"})


INTERNVIT_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model", "internvit_tiny")
INTERNVIT_MEAN = (0.485, 0.456, 0.406)
INTERNVIT_STD = (0.229, 0.224, 0.225)


def write_tiny_internvit(folder, seed: int = 1, image_size: int = 28, patch_size: int = 7, hidden_size: int = 16,
                         num_hidden_layers: int = 2) -> str:
    """A random tiny InternViT-style tower saved as InternViT-300M-448px is released: config.json with
    ``model_type`` ``intern_vit_6b`` and an ``auto_map`` to the ``.py`` files beside it (remote code),
    safetensors weights, and a CLIP-style preprocessor_config.json. Returns the folder."""
    from transformers import AutoConfig, AutoModel

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(INTERNVIT_CODE)):
        if name.endswith(".py"):
            shutil.copyfile(os.path.join(INTERNVIT_CODE, name), os.path.join(folder, name))
    config = {
        "model_type": "intern_vit_6b", "architectures": ["TinyInternVisionModel"],
        "auto_map": {"AutoConfig": "configuration_tiny_intern_vit.TinyInternVisionConfig",
                     "AutoModel": "modeling_tiny_intern_vit.TinyInternVisionModel"},
        "image_size": image_size, "patch_size": patch_size, "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size, "num_hidden_layers": num_hidden_layers, "num_attention_heads": 2,
    }
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True), trust_remote_code=True)
    model.save_pretrained(folder)
    processor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size}, "resample": 3,
        "do_normalize": True, "image_mean": list(INTERNVIT_MEAN), "image_std": list(INTERNVIT_STD),
    }
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as fh:
        json.dump(processor, fh, indent=2)
    return folder
