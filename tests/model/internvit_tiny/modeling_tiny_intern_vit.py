"""A tiny InternViT-style vision transformer, loaded as remote code (``trust_remote_code=True``).

Parameter names follow InternViT's layout (``embeddings.class_embedding``,
``embeddings.patch_embedding``, ``embeddings.position_embedding``, ``encoder.layers.N.attn.qkv``,
``...attn.proj``, ``...mlp.fc1/fc2``, ``...norm1/norm2``, ``...ls1/ls2``), and like InternViT there is
no final norm: ``hidden_states[-1]`` is ``last_hidden_state``. Written for vitacore's tests; no
InternVL code is copied.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_tiny_intern_vit import TinyInternVisionConfig


class TinyInternEmbeddings(nn.Module):
    """Patch tokens plus a leading CLS token, with learned absolute positions."""

    def __init__(self, config: TinyInternVisionConfig):
        super().__init__()
        dim = config.hidden_size
        num_patches = (config.image_size // config.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (N, rows*cols, dim), row-major
        cls = self.class_embedding.expand(patches.shape[0], -1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(patches.dtype)


class TinyInternAttention(nn.Module):
    def __init__(self, config: TinyInternVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class TinyInternMLP(nn.Module):
    def __init__(self, config: TinyInternVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TinyInternLayer(nn.Module):
    """Pre-norm block with InternViT's per-channel layer scales ``ls1`` / ``ls2``."""

    def __init__(self, config: TinyInternVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = TinyInternAttention(config)
        self.ls1 = nn.Parameter(torch.ones(config.hidden_size))
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = TinyInternMLP(config)
        self.ls2 = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class TinyInternEncoder(nn.Module):
    def __init__(self, config: TinyInternVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(TinyInternLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        states = (x,)
        for layer in self.layers:
            x = layer(x)
            states += (x,)
        return x, states


class TinyInternVisionModel(PreTrainedModel):
    """``forward(pixel_values, output_hidden_states=...)`` like InternViT's ``InternVisionModel``."""

    config_class = TinyInternVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"

    def __init__(self, config: TinyInternVisionConfig):
        super().__init__(config)
        self.embeddings = TinyInternEmbeddings(config)
        self.encoder = TinyInternEncoder(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, TinyInternEmbeddings):
            nn.init.trunc_normal_(module.class_embedding, std=std)
            nn.init.trunc_normal_(module.position_embedding, std=std)
        elif isinstance(module, TinyInternLayer):
            nn.init.constant_(module.ls1, self.config.initializer_factor)
            nn.init.constant_(module.ls2, self.config.initializer_factor)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = None, return_dict: bool = None,
                **kwargs) -> BaseModelOutputWithPooling:
        last, states = self.encoder(self.embeddings(pixel_values))
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=last[:, 0],
                                          hidden_states=states if output_hidden_states else None)
