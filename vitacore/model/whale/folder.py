"""A VITA audio-encoder folder (``train.yaml``, ``global_cmvn``, ``final.pt``) into vitacore modules.

``final.pt`` is a plain state dict of VITA's wrapper: ``encoder.*`` (the encoder), ``adpter.*`` (the
adapter, VITA's spelling) and, when audio prompts were trained, ``prompt_embeddings.weight``. VITA
copies the keys whose shapes match and silently leaves the rest random; vitacore loads strictly and
names every missing, unexpected or mis-shaped key. The file is read with ``weights_only=True``: a
state dict needs nothing else, and a received file cannot run code.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from vitacore.console import logger
from vitacore.model.audio_adapters import build_audio_adapter
from vitacore.model.loading import read_tensor_file
from vitacore.model.whale.config import CONFIG_FILE, WhaleConfig, read_whale_config
from vitacore.model.whale.encoder import WhaleEncoder

CMVN_FILE = "global_cmvn"
WEIGHTS_FILE = "final.pt"
WHALE_FILES = (CONFIG_FILE, CMVN_FILE, WEIGHTS_FILE)
_ENCODER, _ADAPTER, _PROMPT = "encoder.", "adpter.", "prompt_embeddings."
_CMVN_KEYS = ("global_cmvn.mean", "global_cmvn.istd")  # optional in final.pt: the cmvn file's values stand


def is_whale_folder(path: str) -> bool:
    """True when ``path`` is a VITA audio-encoder folder (it has ``train.yaml``)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_cmvn(path: str, is_json: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and inverse standard deviation from a CMVN statistics file.

    JSON (``mean_stat``, ``var_stat``, ``frame_num``) or Kaldi text (``[ sums... N`` then ``squares... 0 ]``);
    ``mean = sum / N``, ``var = squares / N - mean²`` floored at 1e-20, ``istd = 1 / sqrt(var)``.

    Args:
        path: the file.
        is_json: the yaml's ``is_json_cmvn``; None: JSON when the file starts with ``{``.

    Raises:
        ValueError: a Kaldi binary file, or one that does not parse; the message names the file.
    """
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw.startswith(b"\0B"):
        raise ValueError(f"{path}: a Kaldi binary CMVN file, which VITA cannot read either; convert it to text "
                         "(copy-matrix --binary=false) or JSON")
    text = raw.decode("utf-8", errors="replace")
    if is_json is None:
        is_json = text.lstrip().startswith("{")
    try:
        if is_json:
            stats = json.loads(text)
            sums, squares, count = stats["mean_stat"], stats["var_stat"], float(stats["frame_num"])
        else:
            tokens = text.split()
            if tokens[0] != "[" or tokens[-1] != "]" or tokens[-2] != "0":
                raise ValueError("expected '[ sums... count squares... 0 ]'")
            dim = (len(tokens) - 4) // 2
            sums = [float(t) for t in tokens[1:dim + 1]]
            count = float(tokens[dim + 1])
            squares = [float(t) for t in tokens[dim + 2:2 * dim + 2]]
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise ValueError(f"{path}: not a CMVN file in the {'JSON' if is_json else 'Kaldi text'} format the yaml's "
                         f"is_json_cmvn asks for ({err})") from None
    if len(sums) != len(squares) or count <= 0:
        raise ValueError(f"{path}: CMVN statistics of different lengths or a frame count of {count}")
    means = [s / count for s in sums]
    istd = [1.0 / math.sqrt(max(q / count - m * m, 1.0e-20)) for q, m in zip(squares, means)]
    return torch.tensor(means, dtype=torch.float64).float(), torch.tensor(istd, dtype=torch.float64).float()


@dataclass
class WhaleParts:
    """What a VITA audio-encoder folder builds.

    Attributes:
        encoder: the :class:`WhaleEncoder` (with ``source``, ``fbank_settings`` and ``save_config``).
        adapter: the adapter ``model_conf.adpter_type`` names.
        prompt_state: ``final.pt``'s prompt embeddings (``{"weight": ...}``), or None.
        config: the folder's settings.
    """

    encoder: WhaleEncoder
    adapter: nn.Module
    prompt_state: Optional[dict]
    config: WhaleConfig


def build_whale_parts(folder: str, dtype: torch.dtype = torch.float32, llm_hidden_size: Optional[int] = None,
                      source: Optional[str] = None) -> WhaleParts:
    """Encoder and adapter of the shapes ``folder``'s yaml describes, with fresh weights (the CMVN from
    ``global_cmvn``); a full checkpoint's shards fill the rest.

    Raises:
        FileNotFoundError: train.yaml or global_cmvn is missing.
        ValueError: the yaml asks for something vitacore does not build, or its ``llm_embed_dim`` is
            not the LLM's width.
    """
    config = read_whale_config(folder)
    cmvn_path = os.path.join(folder, CMVN_FILE)
    if not os.path.isfile(cmvn_path):
        raise FileNotFoundError(f"--audio_encoder {folder!r}: no {CMVN_FILE} (VITA's audio encoder folder holds "
                                f"{', '.join(WHALE_FILES)})")
    adapter_conf = config.adapter
    if llm_hidden_size is not None and adapter_conf.llm_embed_dim != llm_hidden_size:
        raise ValueError(f"{os.path.join(folder, CONFIG_FILE)}: model_conf.llm_embed_dim is "
                         f"{adapter_conf.llm_embed_dim} but the LLM's hidden size is {llm_hidden_size}; this audio "
                         "encoder's adapter was made for another LLM")
    if config.encoder.dynamic_chunks:
        logger.info(f"vitacore: note: {os.path.join(folder, CONFIG_FILE)} asks for dynamic chunks "
                    "(transformer-dynamic-chunks true, VITA's default when the key is absent): VITA draws a random "
                    "attention chunk on every call, so one clip encodes differently each time; vitacore's encoder "
                    "attends over the whole clip instead")
    if config.features.dither > 0:
        logger.info(f"vitacore: note: {os.path.join(folder, CONFIG_FILE)} sets fbank dither "
                    f"{config.features.dither}: as in VITA, each clip's features get fresh random noise on every "
                    "read, which no seed reproduces (a resumed run sees other noise); set dither 0.0 for "
                    "repeatable features")
    mean, istd = read_cmvn(cmvn_path, config.cmvn_is_json)
    if mean.numel() != config.encoder.input_dim:
        raise ValueError(f"{cmvn_path}: {mean.numel()} CMVN dimensions, but the encoder reads "
                         f"{config.encoder.input_dim} fbank bins")
    encoder = WhaleEncoder(config.encoder, mean, istd).to(dtype)
    encoder.source = source or os.path.abspath(folder)
    encoder.fbank_settings = config.features
    encoder.config_files = {}
    for name in (CONFIG_FILE, CMVN_FILE):  # kept, so an export carries them without the source folder
        with open(os.path.join(folder, name), "rb") as fh:
            encoder.config_files[name] = fh.read()
    adapter = build_audio_adapter(adapter_conf.kind, adapter_conf.enc_out_dim, adapter_conf.llm_embed_dim,
                                  adapter_conf.kernel_size, adapter_conf.norm, adapter_conf.activation).to(dtype)
    return WhaleParts(encoder, adapter, None, config)


def _read_weights(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--audio_encoder {os.path.dirname(path)!r}: no {WEIGHTS_FILE}")
    return read_tensor_file(path, f"--audio_encoder {os.path.dirname(path)!r}: {WEIGHTS_FILE} ({path})")


def _fill(module: nn.Module, state: dict, prefix: str, path: str, optional=()) -> None:
    expected = module.state_dict()
    given = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    missing = sorted(prefix + key for key in set(expected) - set(given) - set(optional))
    unexpected = sorted(prefix + key for key in set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: keys do not fit VITA's audio encoder as train.yaml describes it (missing "
                         f"{missing}, unexpected {unexpected}); the weights belong to another configuration")
    for key, value in given.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{path}: {prefix}{key} has shape {tuple(value.shape)} but train.yaml's configuration "
                             f"needs {tuple(expected[key].shape)}")
    module.load_state_dict(given, strict=False)


def load_whale_folder(folder: str, dtype: torch.dtype = torch.float32,
                      llm_hidden_size: Optional[int] = None) -> WhaleParts:
    """Encoder, adapter and any prompt embeddings of a VITA audio-encoder folder, weights from ``final.pt``.

    ``encoder.global_cmvn.*`` in ``final.pt``, when present, replace the ``global_cmvn`` file's
    statistics (as in VITA).

    Raises:
        FileNotFoundError: a file of the folder is missing.
        ValueError: a missing, unexpected or mis-shaped key (named, with the file), or a yaml setting
            vitacore does not build.
    """
    parts = build_whale_parts(folder, torch.float32, llm_hidden_size)
    path = os.path.join(folder, WEIGHTS_FILE)
    state = _read_weights(path)
    unknown = sorted(k for k in state if not k.startswith((_ENCODER, _ADAPTER, _PROMPT)))
    if unknown:
        raise ValueError(f"{path}: keys that belong to no part of VITA's audio encoder: {unknown}")
    _fill(parts.encoder, state, _ENCODER, path, optional=_CMVN_KEYS)
    _fill(parts.adapter, state, _ADAPTER, path)
    prompt = {key[len(_PROMPT):]: value for key, value in state.items() if key.startswith(_PROMPT)}
    parts.prompt_state = prompt or None
    parts.encoder.to(dtype)
    parts.adapter.to(dtype)
    return parts
