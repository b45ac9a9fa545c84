"""The audio side: a compact fbank encoder, VITA's subsampling adapter, and the encoder dispatch.

Token arithmetic matches VITA: the encoder's two stride-2 convolutions and the adapter's stride-2
convolution turn ``T`` fbank frames into ``len(ones(T)[2::2][2::2][0::2])`` LLM tokens.

``--audio_encoder PATH`` is a folder of one of three kinds: VITA's own encoder (``train.yaml``,
``global_cmvn``, ``final.pt``: :mod:`vitacore.model.whale`), a transformers Whisper checkpoint
(:mod:`vitacore.model.whisper`), or a folder written by :meth:`AudioEncoder.save` (the tiny default's
kind). Each kind reads its own features: VITA's encoder its yaml's ``fbank_settings``, Whisper its
``feature_extractor``, the tiny one Kaldi fbank of its ``num_mel_bins``
(:func:`vitacore.data.audio_transform_for`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from vitacore.model.audio_adapters import AudioAdapter
from vitacore.model.whale import WHALE_FILES, build_whale_parts, is_whale_folder, load_whale_folder
from vitacore.model.whisper import build_whisper_encoder, is_whisper_folder, load_whisper_encoder

AUDIO_CONFIG_FILE = "vitacore_audio_config.json"
AUDIO_WEIGHTS_FILE = "model.safetensors"


@dataclass
class AudioEncoderConfig:
    """Shape of the built-in audio encoder."""

    num_mel_bins: int = 80
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    ffn_size: int = 128
    dropout: float = 0.0


class AudioEncoder(nn.Module):
    """Conv subsampling (x4 in time) followed by a transformer encoder over fbank frames."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.config = config
        channels = config.hidden_size
        self.subsample = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, stride=2), nn.GELU(),
            nn.Conv2d(channels, channels, kernel_size=3, stride=2), nn.GELU(),
        )
        freq = ((config.num_mel_bins - 1) // 2 - 1) // 2
        self.input_proj = nn.Linear(channels * freq, config.hidden_size)
        layer = nn.TransformerEncoderLayer(
            config.hidden_size, config.num_heads, config.ffn_size, config.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(config.hidden_size)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_mel_bins(self) -> int:
        return self.config.num_mel_bins

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode padded ``(B, T, mel)`` features; return ``(B, T', hidden)`` and output lengths."""
        dtype = self.input_proj.weight.dtype
        x = self.subsample(features.to(dtype).unsqueeze(1))  # (B, C, T', F')
        batch, channels, time, freq = x.shape
        x = self.input_proj(x.permute(0, 2, 1, 3).reshape(batch, time, channels * freq))
        out_lengths = ((lengths - 1) // 2 - 1) // 2
        pad_mask = torch.arange(time, device=x.device)[None, :] >= out_lengths[:, None]
        x = self.layers(x, src_key_padding_mask=pad_mask)
        return self.final_norm(x), out_lengths

    def save_config(self, directory: str) -> None:
        """Write the config (no weights) to ``directory``."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, AUDIO_CONFIG_FILE), "w") as fh:
            json.dump(asdict(self.config), fh, indent=2)

    def save(self, directory: str) -> None:
        """Write the config and weights to ``directory``."""
        self.save_config(directory)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, AUDIO_WEIGHTS_FILE))


def _read_config(path: str) -> AudioEncoderConfig:
    if not os.path.isfile(os.path.join(path, AUDIO_CONFIG_FILE)):
        raise FileNotFoundError(
            f"--audio_encoder {path!r}: not an audio encoder folder vitacore reads: VITA's ({', '.join(WHALE_FILES)}), "
            f"a Whisper checkpoint (config.json with model_type 'whisper' and preprocessor_config.json), or "
            f"vitacore's own ({AUDIO_CONFIG_FILE})"
        )
    with open(os.path.join(path, AUDIO_CONFIG_FILE)) as fh:
        return AudioEncoderConfig(**json.load(fh))


def load_audio_encoder(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the audio encoder in ``path``, weights included, in ``dtype``.

    Raises:
        FileNotFoundError: ``path`` is neither a vitacore audio encoder folder nor a Whisper checkpoint.
    """
    if is_whisper_folder(path):
        return load_whisper_encoder(path, dtype)
    encoder = AudioEncoder(_read_config(path))
    encoder.load_state_dict(load_file(os.path.join(path, AUDIO_WEIGHTS_FILE)), strict=True)
    encoder.source = os.path.abspath(path)
    return encoder.to(dtype)


def build_audio_encoder(path: str, dtype: torch.dtype, source: str) -> nn.Module:
    """An encoder of the kind and shape ``path``'s config describes, without its weights (an export's
    shards hold them); ``source`` is recorded as where it came from."""
    if is_whisper_folder(path):
        return build_whisper_encoder(path, dtype, source)
    encoder = AudioEncoder(_read_config(path)).to(dtype)
    encoder.source = source
    return encoder


@dataclass
class AudioStack:
    """An audio encoder, its adapter to the LLM, and prompt embeddings its folder holds (or None)."""

    encoder: nn.Module
    adapter: nn.Module
    prompt_state: Optional[dict] = None


def load_audio_stack(path: str, dtype: torch.dtype, llm_hidden_size: int, with_weights: bool = True,
                     source: Optional[str] = None, adapter_kernel_size: int = 5) -> AudioStack:
    """The encoder in ``path`` and the adapter that maps it to an LLM of width ``llm_hidden_size``.

    A VITA folder's yaml describes its adapter and ``final.pt`` holds its weights; the other kinds get
    VITA-1.5's ``subsampling`` adapter, freshly initialised.

    Args:
        path: the encoder's folder.
        dtype: the dtype to build in.
        llm_hidden_size: the LLM's width (a VITA folder's ``llm_embed_dim`` must equal it).
        with_weights: False builds the shapes only (a full checkpoint's shards fill them).
        source: where the encoder is recorded to come from (default: ``path``).
        adapter_kernel_size: the fresh subsampling adapter's kernel (not for VITA folders).

    Raises:
        FileNotFoundError / ValueError: ``path`` is not an encoder folder, or its files do not fit.
    """
    if is_whale_folder(path):
        if with_weights:
            parts = load_whale_folder(path, dtype, llm_hidden_size)
            parts.encoder.source = source or parts.encoder.source
        else:
            parts = build_whale_parts(path, dtype, llm_hidden_size, source)
        return AudioStack(parts.encoder, parts.adapter, parts.prompt_state)
    if with_weights:
        encoder = load_audio_encoder(path, dtype)
        encoder.source = source or encoder.source
    else:
        encoder = build_audio_encoder(path, dtype, source or os.path.abspath(path))
    adapter = AudioAdapter(encoder.hidden_size, llm_hidden_size, kernel_size=adapter_kernel_size).to(dtype)
    return AudioStack(encoder, adapter)
