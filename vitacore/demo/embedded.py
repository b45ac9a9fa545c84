"""The embedded default: a tiny model and synthetic data built locally and cached.

Used when no ``--model_name_or_path`` / ``--vision_tower`` / ``--audio_encoder`` / ``--dataset_use`` / ``--data_path``
is given. Everything is random-init and deterministic; the only training done here is a short
text-only warm-up that teaches the tiny LLM to answer from context (see
:func:`vitacore.data.synthetic.text_warmup_records`). The result is cached under
``$VITACORE_CACHE`` (default ``~/.cache/vitacore``) and built once, safely across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from vitacore.data import synthetic
from vitacore.data.conversation import get_template, tokenize_conversation
from vitacore.data.dataset import Collator, Sample
from vitacore.data.tokenizer import build_tokenizer, save_tokenizer
from vitacore.model.audio import AudioEncoder, AudioEncoderConfig

DEFAULT_VERSION = "default-v4"
READY_MARKER = "READY.json"
WARMUP_STEPS = 300
WARMUP_BATCH = 32
WARMUP_LR = 2e-3
TOWER_STEPS = 1000
TOWER_BATCH = 32
TOWER_LR = 2e-3


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


def ensure_default_assets(cache_dir: str | None = None, log=print) -> DefaultAssets:
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
        log(f"vitacore: building the embedded default model and data in {root} (once)")
        staging = f"{root}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        assets = _assets(staging)
        _build(assets, log)
        with open(os.path.join(staging, READY_MARKER), "w") as fh:
            json.dump({"version": DEFAULT_VERSION, "seconds": round(time.time() - started, 1)}, fh)
        os.rename(staging, root)
        log(f"vitacore: embedded default ready in {time.time() - started:.1f}s")
    return _assets(root)


def _build(assets: DefaultAssets, log) -> None:
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    save_tokenizer(tokenizer, assets.llm)
    llm = _tiny_llm(tokenizer)
    _warm_up(llm, tokenizer, log)
    _save_hf_model(llm, assets.llm)
    _tiny_vision_tower(assets.vision_tower, log)
    torch.manual_seed(2)
    AudioEncoder(AudioEncoderConfig()).save(assets.audio_encoder)
    synthetic.generate(assets.data_root, seed=0)


def _save_hf_model(model, path: str) -> None:
    """Write a transformers model as ``config.json`` + ``model.safetensors``.

    Not ``save_pretrained``: once a process group exists, transformers writes only on global rank 0,
    and the rank that builds the default (whoever takes the lock) may be another one.
    """
    from safetensors.torch import save_model

    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    save_model(model, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _tiny_llm(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(1)
    return Qwen2ForCausalLM(config)


def _tiny_vision_tower(path: str, log) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(3)
    config = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, image_size=64, patch_size=16)
    tower = SiglipVisionModel(config)
    _pretrain_tower(tower, log)
    _save_hf_model(tower, path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as fh:
        json.dump({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                   "size": {"height": 64, "width": 64}}, fh)


def _pretrain_tower(tower, log) -> None:
    """Give the random tower what a real pretrained one has: features that name what is drawn.

    Every patch token of the layer VITA reads (-2) learns to predict colour and shape, so a
    per-token projector can carry the whole answer. Without this, a random tower leaves shape
    ambiguous (circle vs square) and stage 1 plateaus.
    """
    colours, shapes = list(synthetic.COLOURS), list(synthetic.SHAPES)
    width = tower.config.hidden_size
    heads = torch.nn.ModuleDict({"colour": torch.nn.Linear(width, len(colours)),
                                 "shape": torch.nn.Linear(width, len(shapes))})
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=TOWER_LR, weight_decay=0.0)
    rng = random.Random(11)
    size = tower.config.image_size
    started = time.time()
    tower.train()
    for step in range(TOWER_STEPS):
        images, colour_ids, shape_ids = [], [], []
        for _ in range(TOWER_BATCH):
            colour, shape = rng.randrange(len(colours)), rng.randrange(len(shapes))
            image = synthetic.draw_shape(rng, colours[colour], shapes[shape], size)
            images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
            colour_ids.append(colour)
            shape_ids.append(shape)
        features = tower(pixel_values=torch.stack(images), output_hidden_states=True).hidden_states[-2]
        tokens = features.shape[1]
        loss = sum(
            torch.nn.functional.cross_entropy(heads[name](features).flatten(0, 1),
                                              torch.tensor(ids).repeat_interleave(tokens))
            for name, ids in (("colour", colour_ids), ("shape", shape_ids)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == TOWER_STEPS - 1:
            log(f"vitacore: tower pre-training step {step}/{TOWER_STEPS} loss {loss.item():.4f} ({time.time() - started:.0f}s)")
    tower.eval()


def _warm_up(llm, tokenizer, log) -> None:
    """Teach the tiny LLM to answer from context words (text only, plain torch, fp32)."""
    template = get_template("qwen2p5_instruct")
    records = synthetic.text_warmup_records(seed=5, count=4000)
    samples = []
    for record in records:
        modality = "lang" if record["modality"] == "audio" else record["modality"]
        ids, labels = tokenize_conversation(record["conversations"], tokenizer, template, modality,
                                            audio_query=record["modality"] == "audio")
        samples.append(Sample(record["id"], ids, labels, [], [], [], modality))
    collate = Collator(tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(llm.parameters(), lr=WARMUP_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / WARMUP_STEPS)))
    rng = random.Random(7)
    llm.train()
    started = time.time()
    for step in range(WARMUP_STEPS):
        batch = collate(rng.sample(samples, WARMUP_BATCH))
        loss = llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == WARMUP_STEPS - 1:
            log(f"vitacore: warm-up step {step}/{WARMUP_STEPS} loss {loss.item():.4f} ({time.time() - started:.0f}s)")
    llm.eval()
