"""Config of a stand-in for OpenGVLab's InternViT remote code, laid out as the released folder is.

Same file name, class name (``InternVisionConfig``), ``model_type`` (``intern_vit_6b``), constructor
arguments with the release's defaults, and the release's ``from_pretrained`` override (which reads the
``vision_config`` of a full InternVL config). Written for vitacore's tests in its own words; no
InternVL code is copied.
"""

import os
from typing import Union

from transformers.configuration_utils import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)


class InternVisionConfig(PretrainedConfig):
    """InternViT's vision config (the 6B model's defaults, as released).

    Args:
        num_channels: colour channels of the input images.
        patch_size: side of a square patch, in pixels.
        image_size: side of the square input image, in pixels.
        qkv_bias: bias on the fused query / key / value projection.
        hidden_size: token width.
        num_attention_heads: attention heads per layer.
        intermediate_size: width of the MLP's hidden layer.
        qk_normalization: RMS-normalize queries and keys before attention.
        num_hidden_layers: encoder layers.
        use_flash_attn: use flash attention when the ``flash_attn`` package imports.
        hidden_act: the MLP's activation (a key of ``transformers.activations.ACT2FN``).
        norm_type: ``rms_norm`` or ``layer_norm``.
        layer_norm_eps: epsilon of the norms.
        dropout: dropout after the attention projection.
        drop_path_rate: stochastic depth of the last layer (rising linearly from 0 at the first).
        attention_dropout: dropout on the attention probabilities.
        initializer_range: std of the initial weights.
        initializer_factor: initial value of the layer-scale vectors ``ls1`` / ``ls2``.
    """

    model_type = "intern_vit_6b"

    def __init__(self, num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200,
                 num_attention_heads=25, intermediate_size=12800, qk_normalization=True, num_hidden_layers=48,
                 use_flash_attn=True, hidden_act="gelu", norm_type="rms_norm", layer_norm_eps=1e-6, dropout=0.0,
                 drop_path_rate=0.0, attention_dropout=0.0, initializer_range=0.02, initializer_factor=0.1,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "PretrainedConfig":
        """Read a folder's config; a full InternVL config contributes its ``vision_config`` part."""
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        config_dict = config_dict.get("vision_config", config_dict)
        if config_dict.get("model_type", cls.model_type) != cls.model_type:
            logger.warning(f"a {config_dict['model_type']} config read as {cls.model_type}: "
                           "not every combination of the two works")
        return cls.from_dict(config_dict, **kwargs)
