"""Tiny random parts composed into a VitaModel, shared by tests of several packages."""

import json
import os
import shutil

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from vitacore.constants import AUDIO_TOKEN_INDEX as AUD
from vitacore.constants import IGNORE_INDEX as IGN
from vitacore.constants import IMAGE_TOKEN_INDEX as IMG
from vitacore.data.audio import audio_token_length
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


INTERNVIT_REAL_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model", "internvit_real")


def internvit_key_shapes(config: dict) -> dict[str, tuple]:
    """Every tensor of an InternViT checkpoint (``InternVisionModel``'s state dict) and its shape, from
    the config's sizes alone (as the released weights are named: no model is built to learn them)."""
    hidden, inner, patch = config["hidden_size"], config["intermediate_size"], config["patch_size"]
    patches = (config["image_size"] // patch) ** 2
    shapes = {"embeddings.class_embedding": (1, 1, hidden), "embeddings.position_embedding": (1, patches + 1, hidden),
              "embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
              "embeddings.patch_embedding.bias": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        layer = f"encoder.layers.{i}."
        shapes.update({layer + "attn.qkv.weight": (3 * hidden, hidden), layer + "attn.proj.weight": (hidden, hidden),
                       layer + "attn.proj.bias": (hidden,), layer + "mlp.fc1.weight": (inner, hidden),
                       layer + "mlp.fc1.bias": (inner,), layer + "mlp.fc2.weight": (hidden, inner),
                       layer + "mlp.fc2.bias": (hidden,), layer + "ls1": (hidden,), layer + "ls2": (hidden,)})
        if config["qkv_bias"]:
            shapes[layer + "attn.qkv.bias"] = (3 * hidden,)
        if config["qk_normalization"]:
            shapes.update({layer + "attn.q_norm.weight": (hidden,), layer + "attn.k_norm.weight": (hidden,)})
        for norm in ("norm1", "norm2"):
            shapes[layer + norm + ".weight"] = (hidden,)
            if config["norm_type"] == "layer_norm":
                shapes[layer + norm + ".bias"] = (hidden,)
    return shapes


def write_real_internvit(folder, seed: int = 1, image_size: int = 28, patch_size: int = 7, hidden_size: int = 16,
                         num_hidden_layers: int = 2, drop_path_rate: float = 0.1, norm_type: str = "layer_norm",
                         qk_normalization: bool = False) -> str:
    """A tiny tower laid out exactly as OpenGVLab's InternViT-300M-448px folder is released: config.json
    (``auto_map`` to ``configuration_intern_vit`` / ``modeling_intern_vit``, ``torch_dtype`` bfloat16,
    ``use_flash_attn`` true), the two ``.py`` files of ``tests/model/internvit_real`` (which import timm
    and never call ``post_init``), the release's old-style CLIP preprocessor_config.json, and random
    bfloat16 weights in model.safetensors. Returns the folder."""
    from safetensors.torch import save_file

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    for name in ("configuration_intern_vit.py", "modeling_intern_vit.py"):
        shutil.copyfile(os.path.join(INTERNVIT_REAL_CODE, name), os.path.join(folder, name))
    config = {
        "architectures": ["InternVisionModel"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_intern_vit.InternVisionConfig",
                     "AutoModel": "modeling_intern_vit.InternVisionModel"},
        "drop_path_rate": drop_path_rate, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": hidden_size,
        "image_size": image_size, "initializer_factor": 0.1, "initializer_range": 1e-10,
        "intermediate_size": 4 * hidden_size, "layer_norm_eps": 1e-6, "model_type": "intern_vit_6b",
        "norm_type": norm_type, "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": num_hidden_layers,
        "patch_size": patch_size, "qk_normalization": qk_normalization, "qkv_bias": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.37.2", "use_flash_attn": True,
    }
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in internvit_key_shapes(config).items():
        noise = torch.randn(shape, generator=generator)
        if key.endswith(("ls1", "ls2")) or "norm" in key and key.endswith("weight"):
            value = (1.0 if "norm" in key else 0.5) + 0.05 * noise  # norms near 1, layer scales near 0.5
        else:
            value = 0.2 * noise
        weights[key] = value.to(torch.bfloat16).contiguous()
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    processor = {
        "crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(INTERNVIT_MEAN),
        "image_std": list(INTERNVIT_STD), "resample": 3, "size": image_size,
    }
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as fh:
        json.dump(processor, fh, indent=2)
    return folder


class NanLossAtCall(VitaModel):
    """A VitaModel whose training loss turns NaN on its ``bad_call``-th training forward (1-based; 0: never)."""

    bad_call = 5

    def forward(self, **batch):
        output = super().forward(**batch)
        if self.training:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == self.bad_call:
                output["loss"] = output["loss"] * float("nan")
        return output


AUDIO_FRAMES = 40


def media_batch(dims, audio_frames=(AUDIO_FRAMES,)):
    """Row 0: one image, row 1: one audio clip per entry of audio_frames, row 2: text only."""
    torch.manual_seed(123)
    rows = [
        ([1, 2, IMG, 3, 4, 5, 6], [IGN, IGN, IGN, IGN, 4, 5, 6]),
        ([7, *([AUD] * len(audio_frames)), 8, 9, 10], [IGN, *([IGN] * len(audio_frames)), IGN, 9, 10]),
        ([11, 12, 13, 14], [IGN, 12, 13, 14]),
    ]
    longest = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(3, longest, dtype=torch.long)
    labels = torch.full((3, longest), IGN)
    mask = torch.zeros(3, longest, dtype=torch.long)
    for r, (ids, labs) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(labs)] = torch.tensor(labs)
        mask[r, : len(ids)] = 1
    audios = torch.zeros(len(audio_frames), max(audio_frames), dims["mel"])
    for i, n in enumerate(audio_frames):
        audios[i, :n] = torch.randn(n, dims["mel"])
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": mask,
        "images": torch.randn(1, 3, dims["image_size"], dims["image_size"]),
        "audios": audios,
        "audio_lengths": torch.tensor(list(audio_frames)),
        "audio_token_lengths": torch.tensor([audio_token_length(n) for n in audio_frames]),
        "sample_ids": ["img", "aud", "txt"],
    }


def built_stage_recipe(stage: str, output_dir: str, **flags):
    """A ``StageRecipe`` of ``stage`` on the embedded default with its parts built (no training started).

    Evaluation, saving and logging are off unless ``flags`` set them; ``flags`` are set as if given on the
    command line.
    """
    import vitacore

    config = vitacore.RunConfig()
    config.stage = stage
    values = {"eval_strategy": "no", "save_strategy": "no", "logging_steps": 10**9, **flags, "output_dir": output_dir}
    for name, value in values.items():
        config.set(name, value, "flag")
    recipe = vitacore.StageRecipe(config)  # resolves the stage's preset and validates
    recipe.build_parts()
    return recipe
