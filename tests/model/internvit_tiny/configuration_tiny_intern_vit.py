"""Config of a tiny InternViT-style vision model, loaded as remote code (``trust_remote_code=True``).

It reuses InternViT's ``model_type`` (``intern_vit_6b``) and field names, so vitacore dispatches it
exactly as it dispatches OpenGVLab's InternViT-300M-448px. Test code only: no InternVL code is copied.
"""

from transformers import PretrainedConfig


class TinyInternVisionConfig(PretrainedConfig):
    """InternViT's field names, small defaults.

    Args:
        num_channels: image channels.
        image_size: square input size in pixels.
        patch_size: square patch size in pixels.
        hidden_size: token width.
        intermediate_size: MLP width.
        num_hidden_layers: transformer blocks.
        num_attention_heads: attention heads.
        qkv_bias: bias on the fused qkv projection.
        hidden_act: MLP activation (only ``gelu`` here).
        layer_norm_eps: LayerNorm epsilon.
        initializer_range: std of the random init.
        initializer_factor: initial value of the layer-scale vectors.
    """

    model_type = "intern_vit_6b"

    def __init__(self, num_channels=3, image_size=28, patch_size=7, hidden_size=16, intermediate_size=32,
                 num_hidden_layers=2, num_attention_heads=2, qkv_bias=True, hidden_act="gelu",
                 layer_norm_eps=1e-6, initializer_range=0.02, initializer_factor=1.0, **kwargs):
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.qkv_bias = qkv_bias
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        super().__init__(**kwargs)
