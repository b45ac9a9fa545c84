"""The embedded default: a tiny model and synthetic data, built locally (tokenizer training, synthetic
media, tower pre-training, LLM warm-up) and cached. Above :mod:`vitacore.model` and :mod:`vitacore.data`."""

from vitacore.demo.embedded import DefaultAssets, SyntheticSelection, default_cache_dir, ensure_default_assets

__all__ = ["DefaultAssets", "SyntheticSelection", "default_cache_dir", "ensure_default_assets"]
