"""VITA-1.5's own audio encoder ("whale"), read from VITA's folder layout: ``train.yaml``,
``global_cmvn``, ``final.pt``."""

from vitacore.model.whale.config import (
    CONFIG_FILE,
    WhaleAdapterConfig,
    WhaleConfig,
    WhaleEncoderConfig,
    read_whale_config,
)
from vitacore.model.whale.encoder import WhaleEncoder
from vitacore.model.whale.folder import (
    CMVN_FILE,
    WEIGHTS_FILE,
    WHALE_FILES,
    WhaleParts,
    build_whale_parts,
    is_whale_folder,
    load_whale_folder,
    read_cmvn,
)

__all__ = [
    "CMVN_FILE", "CONFIG_FILE", "WEIGHTS_FILE", "WHALE_FILES", "WhaleAdapterConfig", "WhaleConfig",
    "WhaleEncoder", "WhaleEncoderConfig", "WhaleParts", "build_whale_parts", "is_whale_folder",
    "load_whale_folder", "read_cmvn", "read_whale_config",
]
