"""The audio side: a compact fbank encoder, VITA's subsampling adapter, and the encoder dispatch.

Token arithmetic matches VITA: the encoder's two stride-2 convolutions and the adapter's stride-2
convolution turn ``T`` fbank frames into ``len(ones(T)[2::2][2::2][0::2])`` LLM tokens.

``--audio_encoder PATH`` is either a folder written by :meth:`AudioEncoder.save` (the tiny default's
kind) or a transformers Whisper checkpoint (:mod:`vitacore.model.whisper`). Each kind reads its own
features: an encoder's ``feature_extractor`` (Whisper's) or its ``num_mel_bins`` (Kaldi fbank) tells
the data pipeline which (:func:`vitacore.data.audio_transform_for`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

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
            f"--audio_encoder {path!r}: neither a Whisper checkpoint (config.json with model_type 'whisper' and "
            f"preprocessor_config.json) nor a vitacore audio encoder folder ({AUDIO_CONFIG_FILE})"
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


class AudioAdapter(nn.Module):
    """VITA-1.5's subsampling adapter: conv (stride 2) -> LayerNorm -> GELU -> linear.

    Attribute names (``conv1d2``, ``bn2``, ``project``) are VITA's, so ``audio_adpter.bin`` keys map
    one to one.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 5):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1d2 = nn.Conv1d(in_features, 2 * in_features, kernel_size, stride=2)
        self.bn2 = nn.LayerNorm(2 * in_features, eps=1e-3)
        self.relu2 = nn.GELU()
        self.project = nn.Linear(2 * in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, T, in)`` encoder states to ``(B, ceil(T/2), out)`` LLM embeddings."""
        x = F.pad(x.transpose(1, 2), (0, self.kernel_size - 1))
        x = self.conv1d2(x).transpose(1, 2)
        return self.project(self.relu2(self.bn2(x)))
