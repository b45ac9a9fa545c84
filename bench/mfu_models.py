"""bench/gpu_mfu.py's models: random Qwen2.5-0.5B- and SigLIP-so400m-sized (or tiny) ones, and their shapes."""

from __future__ import annotations

from dataclasses import dataclass

from mfu_flops import Shapes


@dataclass(frozen=True)
class Sizes:
    """``Qwen2Config`` and ``SiglipVisionConfig`` keyword arguments."""

    llm: dict
    tower: dict


FULL = Sizes(
    llm=dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
             intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
             tie_word_embeddings=True, hidden_act="silu"),
    tower=dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304,
               image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
)
TINY = Sizes(
    llm=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=1000, max_position_embeddings=4096, rms_norm_eps=1e-6,
             tie_word_embeddings=True, hidden_act="silu"),
    tower=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128,
               image_size=32, patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
)


def image_tokens_of(sizes: Sizes) -> int:
    """LLM positions per image of the random tower (SigLIP keeps every patch)."""
    return (sizes.tower["image_size"] // sizes.tower["patch_size"]) ** 2


def build_random(config, sizes: Sizes, ds_config: dict):
    """LLM + tower built partitioned under ZeRO-3 (as ``vitacore.build_model`` does), plus the rest.

    The LLM's attention is what a stage run picks (flash-attn 2 where installed on a GPU in 16 bits,
    else SDPA); the chunked loss takes ``config.training.loss_chunk_size``.
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, SiglipVisionConfig, SiglipVisionModel
    from transformers.integrations import HfDeepSpeedConfig

    from vitacore.data.images import ImageSpec
    from vitacore.model.audio import AudioAdapter, AudioEncoder, AudioEncoderConfig
    from vitacore.model.families import attention_implementation
    from vitacore.model.multimodal import VitaModel
    from vitacore.model.projector import build_projector
    from vitacore.model.vision import SIGLIP_MEAN, SIGLIP_STD, VisionTower
    from vitacore.recipes import compute_dtype

    dtype = compute_dtype(config)
    torch.manual_seed(config.training.seed)
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    # A weak global: it must stay referenced for the whole construction, or the models load unpartitioned.
    keep_alive = HfDeepSpeedConfig(ds_config) if zero3 else None
    try:
        llm = AutoModelForCausalLM.from_config(Qwen2Config(**sizes.llm), dtype=dtype,
                                               attn_implementation=attention_implementation(dtype))
        encoder = SiglipVisionModel._from_config(SiglipVisionConfig(**sizes.tower), dtype=dtype,
                                                 attn_implementation="sdpa")
    finally:
        del keep_alive
    llm.config.use_cache = False
    spec = ImageSpec(sizes.tower["image_size"], SIGLIP_MEAN, SIGLIP_STD)
    tower = VisionTower(encoder, select_layer=-2, drop_cls=False, image_spec=spec, source="random")
    hidden = llm.config.hidden_size
    projector = build_projector(config.model.mm_projector_type, tower.hidden_size, hidden).to(dtype)
    audio_encoder = AudioEncoder(AudioEncoderConfig()).to(dtype)
    audio_adapter = AudioAdapter(audio_encoder.hidden_size, hidden).to(dtype)
    mm_config = {"mm_vision_tower": "random", "mm_projector_type": config.model.mm_projector_type,
                 "mm_hidden_size": tower.hidden_size}
    return VitaModel(llm, tower, projector, audio_encoder, audio_adapter, None, None,
                     model_max_length=config.training.model_max_length, padding_side="right", mm_config=mm_config,
                     loss_chunk_size=config.training.loss_chunk_size)


def shapes_of(model, text_tokens: int) -> Shapes:
    """The FLOP-relevant shapes of a built ``VitaModel`` (Llama/Qwen2-style LLM, SigLIP/CLIP-style tower)."""
    lc = model.llm.config
    tower = model.vision_tower
    vc = tower.encoder.config
    heads = lc.num_attention_heads
    patches = (vc.image_size // vc.patch_size) ** 2
    return Shapes(
        llm_hidden=lc.hidden_size, llm_layers=lc.num_hidden_layers, llm_heads=heads,
        llm_kv_heads=getattr(lc, "num_key_value_heads", None) or heads,
        llm_head_dim=getattr(lc, "head_dim", None) or lc.hidden_size // heads,
        llm_intermediate=lc.intermediate_size, vocab=lc.vocab_size,
        tower_hidden=vc.hidden_size, tower_layers=vc.num_hidden_layers, tower_intermediate=vc.intermediate_size,
        patch_size=vc.patch_size, channels=getattr(vc, "num_channels", 3),
        patches=patches + (1 if tower.drop_cls else 0), image_tokens=tower.num_tokens_per_image,
        tower_head=bool(getattr(vc, "vision_use_head", False)) and vc.model_type.startswith("siglip"),
        select_layer=tower.select_layer, text_tokens=text_tokens)
