"""The embedded default: a tiny model and synthetic data built locally and cached.

Used when no ``--model_name_or_path`` / ``--vision_tower`` / ``--audio_encoder`` / ``--dataset_use`` / ``--data_path``
is given. Everything is random-init and deterministic; the only training done here is a short
text-only warm-up that teaches the tiny LLM to answer from context, and a pre-training that makes
the tiny tower's features name what is drawn (:mod:`vitacore.demo.warmup`). The result is cached under
``$VITACORE_CACHE`` (default ``~/.cache/vitacore``) and built once, safely across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch
from safetensors.torch import save_model

from vitacore.console import logger
from vitacore.demo import synthetic
from vitacore.demo.tokenizer import build_tokenizer, save_tokenizer
from vitacore.demo.warmup import pretrain_tower, warm_up_llm
from vitacore.model.audio import AudioEncoder, AudioEncoderConfig

DEFAULT_VERSION = "default-v5"
READY_MARKER = "READY.json"


@dataclass(frozen=True)
class SyntheticSelection:
    """Which subsets of the embedded synthetic data a stage trains and evaluates on."""

    train: tuple = ("image",)
    eval: str = "eval_image"


@dataclass(frozen=True)
class DefaultAssets:
    """Paths of the embedded default's parts."""

    root: str
    llm: str
    vision_tower: str
    audio_encoder: str
    data_root: str

    def subset(self, name: str) -> str:
        """Path of a synthetic subset's JSON file (``image``, ``eval_image``, ...)."""
        return os.path.join(self.data_root, f"{name}.json")


def default_cache_dir() -> str:
    """``$VITACORE_CACHE`` or ``~/.cache/vitacore``."""
    return os.environ.get("VITACORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vitacore")


def _assets(root: str) -> DefaultAssets:
    return DefaultAssets(root, os.path.join(root, "llm"), os.path.join(root, "vision_tower"),
                         os.path.join(root, "audio_encoder"), os.path.join(root, "data"))


@contextlib.contextmanager
def _file_lock(path: str):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_default_assets(cache_dir: str | None = None) -> DefaultAssets:
    """Return the cached embedded default, building it first if needed.

    The build goes to a temporary folder that is renamed into place with a marker written last,
    under a file lock, so concurrent ranks build it once and a killed build is never used.
    """
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    root = os.path.join(cache_dir, DEFAULT_VERSION)
    if os.path.exists(os.path.join(root, READY_MARKER)):
        return _assets(root)
    with _file_lock(os.path.join(cache_dir, f".{DEFAULT_VERSION}.lock")):
        if os.path.exists(os.path.join(root, READY_MARKER)):
            return _assets(root)
        started = time.time()
        logger.info(f"vitacore: building the embedded default model and data in {root} (once)")
        staging = f"{root}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        assets = _assets(staging)
        _build(assets)
        with open(os.path.join(staging, READY_MARKER), "w") as fh:
            json.dump({"version": DEFAULT_VERSION, "seconds": round(time.time() - started, 1)}, fh)
        os.rename(staging, root)
        logger.info(f"vitacore: embedded default ready in {time.time() - started:.1f}s")
    return _assets(root)


def _build(assets: DefaultAssets) -> None:
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    save_tokenizer(tokenizer, assets.llm)
    llm = _tiny_llm(tokenizer)
    warm_up_llm(llm, tokenizer)
    _save_hf_model(llm, assets.llm)
    _tiny_vision_tower(assets.vision_tower)
    torch.manual_seed(2)
    AudioEncoder(AudioEncoderConfig()).save(assets.audio_encoder)
    synthetic.generate(assets.data_root, seed=0)


def _save_hf_model(model, path: str) -> None:
    """Write a transformers model as ``config.json`` + ``model.safetensors``.

    Not ``save_pretrained``: once a process group exists, transformers writes only on global rank 0,
    and the rank that builds the default (whoever takes the lock) may be another one.
    """
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    save_model(model, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _tiny_llm(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM  # model classes import lazily: only a build needs them

    vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(1)
    return Qwen2ForCausalLM(config)


def _tiny_vision_tower(path: str) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(3)
    config = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, image_size=64, patch_size=16)
    tower = SiglipVisionModel(config)
    pretrain_tower(tower)
    _save_hf_model(tower, path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as fh:
        json.dump({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                   "size": {"height": 64, "width": 64}}, fh)


