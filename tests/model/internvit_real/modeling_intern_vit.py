"""A stand-in for OpenGVLab's InternViT remote code with the released file's layout and quirks.

vitacore's tests load it as they would load InternViT-300M-448px: the same file name, class names,
parameter names and ``forward`` signature, and the release's traits that matter to a loader:

- module-level imports of ``einops`` and of ``timm`` (only for ``DropPath``), so transformers refuses
  to import the file where ``timm`` is not installed;
- a guarded import of ``flash_attn`` that falls back to plain attention, with a printed note;
- ``InternVisionModel.__init__`` never calls ``self.post_init()`` (so transformers 5's
  ``from_pretrained`` fails on the missing ``all_tied_weights_keys``);
- the encoder checkpoints every layer whenever it trains (``gradient_checkpointing = True``).

Written for vitacore's tests in its own words; no InternVL code is copied.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from timm.models.layers import DropPath
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

from .configuration_intern_vit import InternVisionConfig

try:
    from flash_attn.flash_attn_interface import flash_attn_varlen_qkvpacked_func  # noqa: F401

    has_flash_attn = True
except ImportError:
    print("FlashAttention2 is not installed.")
    has_flash_attn = False

logger = logging.get_logger(__name__)


class InternRMSNorm(nn.Module):
    """RMS norm computed in float32, scaled by a learned per-channel weight."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


NORM2FN = {"rms_norm": InternRMSNorm, "layer_norm": nn.LayerNorm}


class InternVisionEmbeddings(nn.Module):
    """A CLS token and the patch tokens, plus learned positions resized to the input's patch grid."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(3, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_positions, self.embed_dim))

    def _get_pos_embed(self, pos_embed, H, W):
        """The patch positions, laid out on the trained grid, bicubically resized to ``H`` × ``W``."""
        side = self.image_size // self.patch_size
        grid = pos_embed.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(H, W), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, H * W).permute(0, 2, 1).to(pos_embed.dtype)

    def forward(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values)  # (N, C, rows, cols)
        batch, _, rows, cols = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(batch, 1, -1).to(dtype)
        positions = torch.cat([self.position_embedding[:, :1, :],
                               self._get_pos_embed(self.position_embedding[:, 1:, :], rows, cols)], dim=1)
        return torch.cat([cls, patches], dim=1) + positions.to(dtype)


class InternAttention(nn.Module):
    """Multi-head self-attention over a fused qkv projection, optionally with RMS-normed queries and keys."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.use_flash_attn = config.use_flash_attn and has_flash_attn
        if config.use_flash_attn and not has_flash_attn:
            print("Warning: Flash Attention is not available, use_flash_attn is set to False.")
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"hidden_size {self.embed_dim} is not a multiple of num_attention_heads {self.num_heads}")
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.attn_drop = nn.Dropout(config.attention_dropout)
        self.proj_drop = nn.Dropout(config.dropout)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def _naive_attn(self, x):
        B, N, C = x.shape
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        q, k, v = qkv.unbind(0)
        if self.qk_normalization:
            q = self.q_norm(rearrange(q, "b h n d -> b n (h d)"))
            k = self.k_norm(rearrange(k, "b h n d -> b n (h d)"))
            q = rearrange(q, "b n (h d) -> b h n d", h=self.num_heads)
            k = rearrange(k, "b n (h d) -> b h n d", h=self.num_heads)
        attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_flash_attn:  # never taken on CPU machines: flash_attn is CUDA-only
            raise NotImplementedError("this test stand-in has no flash-attention path")
        return self._naive_attn(hidden_states)


class InternMLP(nn.Module):
    """Two linear layers around the configured activation."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm block: attention and MLP residuals, each scaled per channel and dropped per sample."""

    def __init__(self, config: InternVisionConfig, drop_path_rate: float):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.norm_type = config.norm_type
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = NORM2FN[self.norm_type](self.embed_dim, eps=config.layer_norm_eps)
        self.norm2 = NORM2FN[self.norm_type](self.embed_dim, eps=config.layer_norm_eps)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(self.embed_dim))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(self.embed_dim))
        self.drop_path1 = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states + self.drop_path1(self.attn(self.norm1(hidden_states).to(dtype)) * self.ls1)
        return hidden_states + self.drop_path2(self.mlp(self.norm2(hidden_states).to(dtype)) * self.ls2)


class InternVisionEncoder(nn.Module):
    """The stack of layers; every layer is recomputed in backward while training (as released)."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        rates = [r.item() for r in torch.linspace(0, config.drop_path_rate, config.num_hidden_layers)]
        self.layers = nn.ModuleList([InternVisionEncoderLayer(config, rates[i])
                                     for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = True

    def forward(self, inputs_embeds, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None) -> Union[Tuple, BaseModelOutput]:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.use_return_dict
        states = () if output_hidden_states else None
        hidden_states = inputs_embeds
        for layer in self.layers:
            if output_hidden_states:
                states += (hidden_states,)
            if self.gradient_checkpointing and self.training:
                hidden_states = torch.utils.checkpoint.checkpoint(layer, hidden_states)
            else:
                hidden_states = layer(hidden_states)
        if output_hidden_states:
            states += (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, states) if v is not None)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=states)


class InternVisionModel(PreTrainedModel):
    """The vision tower. Like the release, ``__init__`` does not call ``self.post_init()``."""

    main_input_name = "pixel_values"
    config_class = InternVisionConfig
    _no_split_modules = ["InternVisionEncoderLayer"]

    def __init__(self, config: InternVisionConfig):
        super().__init__(config)
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def get_input_embeddings(self):
        return self.embeddings

    def forward(self, pixel_values: Optional[torch.FloatTensor] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, pixel_embeds: Optional[torch.FloatTensor] = None
                ) -> Union[Tuple, BaseModelOutputWithPooling]:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.use_return_dict
        if pixel_values is None and pixel_embeds is None:
            raise ValueError("pass pixel_values or pixel_embeds")
        if pixel_embeds is not None:
            hidden_states = pixel_embeds
        elif pixel_values.dim() == 4:
            hidden_states = self.embeddings(pixel_values)
        else:
            raise ValueError(f"pixel_values must be (N, C, H, W); got shape {tuple(pixel_values.shape)}")
        encoded = self.encoder(inputs_embeds=hidden_states, output_hidden_states=output_hidden_states,
                               return_dict=return_dict)
        last = encoded.last_hidden_state if return_dict else encoded[0]
        pooled = last[:, 0, :]
        if not return_dict:
            return (last, pooled) + tuple(encoded[1:])
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled,
                                          hidden_states=encoded.hidden_states, attentions=encoded.attentions)
