"""Adapters from audio-encoder states to LLM embeddings, with VITA's module names.

The attribute names (``conv1d1``, ``bn1``, ``conv1d2``, ``bn2``, ``project``; ``adpter`` for the
linear one) are VITA's, so ``audio_adpter.bin`` and ``final.pt`` keys map one to one. Callers zero
the encoder's padded frames before the adapter (VITA does it inside), so a strided convolution never
mixes padding into a shorter clip's tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_KINDS = ("subsampling", "cnn", "linear")


def _batch_norm(channels: int) -> nn.BatchNorm1d:
    # VITA passes Keras-style momentum 0.99 to PyTorch, where it weighs the *new* batch: kept as is.
    return nn.BatchNorm1d(channels, eps=1e-3, momentum=0.99)


class AudioAdapter(nn.Module):
    """VITA-1.5's ``subsampling`` adapter: conv (stride 2) -> norm -> activation -> linear.

    Args:
        in_features / out_features: encoder width and LLM width.
        kernel_size: the convolution's width (right-padded by ``kernel_size - 1``).
        norm: ``layer`` (LayerNorm, VITA-1.5's) or ``batch`` (BatchNorm over channels).
        activation: ``gelu`` (erf form); anything else is ReLU, as in VITA.
    """

    time_stride = 2

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 5, norm: str = "layer",
                 activation: str = "gelu"):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1d2 = nn.Conv1d(in_features, 2 * in_features, kernel_size, stride=2)
        self.bn2 = nn.LayerNorm(2 * in_features, eps=1e-3) if norm == "layer" else _batch_norm(2 * in_features)
        self.relu2 = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.project = nn.Linear(2 * in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, T, in)`` encoder states to ``(B, ceil(T/2), out)`` LLM embeddings."""
        x = self.conv1d2(F.pad(x.transpose(1, 2), (0, self.kernel_size - 1)))  # (B, 2C, T')
        # LayerNorm normalizes each frame's channels; BatchNorm1d wants channels in dim 1.
        x = self.bn2(x.transpose(1, 2)) if isinstance(self.bn2, nn.LayerNorm) else self.bn2(x).transpose(1, 2)
        return self.project(self.relu2(x))


class CnnAdapter(nn.Module):
    """VITA's ``cnn`` adapter: two causal convolutions (left-padded), BatchNorm and ReLU, then linear;
    one LLM token per encoder state."""

    time_stride = 1

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 5):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1d1 = nn.Conv1d(in_features, 2 * in_features, kernel_size)
        self.bn1 = _batch_norm(2 * in_features)
        self.conv1d2 = nn.Conv1d(2 * in_features, 4 * in_features, kernel_size)
        self.bn2 = _batch_norm(4 * in_features)
        self.project = nn.Linear(4 * in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, T, in)`` to ``(B, T, out)``."""
        causal = (self.kernel_size - 1, 0)
        x = torch.relu(self.bn1(self.conv1d1(F.pad(x.transpose(1, 2), causal))))
        x = torch.relu(self.bn2(self.conv1d2(F.pad(x, causal))))
        return self.project(x.transpose(1, 2))


class LinearAdapter(nn.Module):
    """VITA's ``linear`` adapter: one Linear (keys ``adpter.*`` inside the adapter, as VITA nests it)."""

    time_stride = 1

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.adpter = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, T, in)`` to ``(B, T, out)``."""
        return self.adpter(x)


def build_audio_adapter(kind: str, in_features: int, out_features: int, kernel_size: int = 5, norm: str = "layer",
                        activation: str = "gelu") -> nn.Module:
    """The adapter VITA's ``adpter_type`` names.

    Raises:
        ValueError: an unknown kind.
    """
    if kind == "subsampling":
        return AudioAdapter(in_features, out_features, kernel_size, norm, activation)
    if kind == "cnn":
        return CnnAdapter(in_features, out_features, kernel_size)
    if kind == "linear":
        return LinearAdapter(in_features, out_features)
    raise ValueError(f"audio adapter type {kind!r} is not one of {', '.join(ADAPTER_KINDS)}")
