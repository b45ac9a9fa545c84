"""The full export in VITA's layout: its names (:mod:`.format`), its writer and its reader, together."""

from vitacore.checkpoint.export.format import (
    AUDIO_SUBFOLDER,
    CONFIG_FILE,
    EXPORT_FORMAT,
    INDEX_FILE,
    VISION_SUBFOLDER,
    WEIGHTS_FILE,
    is_full_export,
    llm_config_for,
    read_export_config,
)
from vitacore.checkpoint.export.reader import load_export_bundle, load_export_model, load_full_export
from vitacore.checkpoint.export.writer import save_full_export

__all__ = [
    "AUDIO_SUBFOLDER", "CONFIG_FILE", "EXPORT_FORMAT", "INDEX_FILE", "VISION_SUBFOLDER", "WEIGHTS_FILE",
    "is_full_export", "llm_config_for", "load_export_bundle", "load_export_model", "load_full_export",
    "read_export_config", "save_full_export",
]
