"""Data: VITA JSON records, templates, media, tokenization, collation, synthetic demo data."""

from vitacore.data.build import DataBundle, SyntheticSelection, build_data
from vitacore.data.conversation import ChatTemplate, get_template, tokenize_conversation
from vitacore.data.dataset import Collator, VitaJsonDataset, load_records
from vitacore.data.registry import DataSource, load_registry, sources_from_config

__all__ = [
    "ChatTemplate", "Collator", "DataBundle", "DataSource", "SyntheticSelection", "VitaJsonDataset", "build_data", "get_template", "load_records",
    "load_registry", "sources_from_config", "tokenize_conversation",
]
