"""VITA's audio encoder ("whale"): global CMVN, 4x convolutional subsampling, a transformer.

Module and attribute names follow VITA's, so a ``final.pt``'s ``encoder.*`` keys load one to one:
``global_cmvn.{mean,istd}``, ``enc.0.core.conv.{0,2}``, ``enc.0.core.out.0``, ``enc.1.embed.{0,1}``,
``enc.1.encoders.{i}.{self_attn,feed_forward,norm1,norm2}``, ``enc.1.after_norm``.

Two of VITA's quirks are reproduced on purpose, because released weights were trained with them:
the relative-position term multiplies the query by the *absolute* key position (no shift), and the
sinusoid table is not added to the input in ``rel-enc`` mode. One is not: a yaml asking for
``dynamic-chunks`` gets full attention over the valid frames, where VITA draws a random chunk size
on every call (in evaluation too), which would make features of one clip differ between calls.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn as nn

from vitacore.model.whale.config import WhaleEncoderConfig

MASKED_SCORE = -65504.0  # VITA fills masked scores with float16's minimum, in every dtype
MIN_FRAMES = 7  # two 3-wide stride-2 convolutions need 7 frames for one output
# VITA's sinusoid tables: 5000 rows (rel-enc); 1500 rows with a strict bound (abs-enc).
_TABLE_ROWS = {"rel-enc": 5000, "abs-enc": 1500}
_MAX_FRAMES = {"rel-enc": 5000, "abs-enc": 1499}


class GlobalCmvn(nn.Module):
    """``(x - mean) * istd`` with the statistics as buffers (``final.pt`` may carry its own)."""

    def __init__(self, mean: torch.Tensor, istd: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("istd", istd.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.istd


class _Conv2dSubsampling4(nn.Module):
    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, output_dim, 3, 2), nn.ReLU(), nn.Conv2d(output_dim, output_dim, 3, 2),
                                  nn.ReLU())
        self.out = nn.Sequential(nn.Linear(output_dim * (((input_dim - 1) // 2 - 1) // 2), output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.unsqueeze(1))  # (B, C, T/4, F/4)
        batch, channels, time, freq = x.shape
        return self.out(x.transpose(1, 2).reshape(batch, time, channels * freq))


class Subsampling(nn.Module):
    """Time /4 by two stride-2 convolutions; output frame t is valid when input frame 4t+6 is."""

    def __init__(self, config: WhaleEncoderConfig):
        super().__init__()
        self.core = _Conv2dSubsampling4(config.input_dim, config.subsampling_dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.core(x), valid[:, 2::2][:, 2::2]


class RelativeAttention(nn.Module):
    """Multi-head attention with VITA's optional position terms (``rel-enc``)."""

    def __init__(self, config: WhaleEncoderConfig):
        super().__init__()
        dim, heads = config.hidden_size, config.num_heads
        self.num_heads, self.head_dim = heads, dim // heads
        self.linear_q, self.linear_k = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.linear_v, self.linear_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout = nn.Dropout(config.attention_dropout)
        self.relative = config.pos_enc == "rel-enc"
        if self.relative:
            self.linear_pos = nn.Linear(dim, dim, bias=False)
            self.pos_bias_u = nn.Parameter(torch.empty(heads, self.head_dim))
            self.pos_bias_v = nn.Parameter(torch.empty(heads, self.head_dim))
            nn.init.xavier_uniform_(self.pos_bias_u)
            nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, T, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.linear_q(x)), self._heads(self.linear_k(x)), self._heads(self.linear_v(x))
        if self.relative:
            p = self._heads(self.linear_pos(pos.to(x.dtype)))  # (1, h, T, d): absolute key positions
            content = (q + self.pos_bias_u[:, None, :]) @ k.transpose(-2, -1)
            position = (q + self.pos_bias_v[:, None, :]) @ p.transpose(-2, -1)
            scores = (content + position) / math.sqrt(self.head_dim)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        hidden = mask.unsqueeze(1).logical_not()  # (B, 1, T|1, T)
        weights = torch.softmax(scores.masked_fill(hidden, MASKED_SCORE), dim=-1).masked_fill(hidden, 0.0)
        out = self.dropout(weights) @ v
        return self.linear_out(out.transpose(1, 2).reshape(x.shape[0], -1, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    """``w_2(dropout(relu(w_1 x)))``."""

    def __init__(self, config: WhaleEncoderConfig):
        super().__init__()
        self.w_1 = nn.Linear(config.hidden_size, config.ffn_size)
        self.w_2 = nn.Linear(config.ffn_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(torch.relu(self.w_1(x))))


class TransformerBlock(nn.Module):
    """Attention then feed-forward, each residual, LayerNorm before (pre-norm) or after."""

    def __init__(self, config: WhaleEncoderConfig):
        super().__init__()
        self.self_attn = RelativeAttention(config)
        self.feed_forward = FeedForward(config)
        self.norm1, self.norm2 = nn.LayerNorm(config.hidden_size), nn.LayerNorm(config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.normalize_before = config.normalize_before

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.normalize_before:
            x = x + self.dropout(self.self_attn(self.norm1(x), mask, pos))
            return x + self.dropout(self.feed_forward(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.self_attn(x, mask, pos)))
        return self.norm2(x + self.dropout(self.feed_forward(x)))


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """VITA's float32 sin/cos table: row t, column 2i = sin(t / 10000^(2i/dim)), 2i+1 = cos(...)."""
    position = torch.arange(num_positions, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate)
    return table


def chunk_mask(size: int, chunk_size: int, left_chunks: int, device=None) -> torch.Tensor:
    """``(size, size)``: frame i sees j in its own chunk and ``left_chunks`` chunks before it
    (all earlier chunks when ``left_chunks`` < 0)."""
    chunk = torch.arange(size, device=device) // chunk_size
    ahead_ok = chunk[None, :] <= chunk[:, None]
    if left_chunks < 0:
        return ahead_ok
    return ahead_ok & (chunk[None, :] >= chunk[:, None] - left_chunks)


class Transformer(nn.Module):
    """Input layer, position handling, blocks and the final norm."""

    def __init__(self, config: WhaleEncoderConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        if config.input_layer == "linear":
            self.embed = nn.Sequential(nn.Linear(config.subsampling_dim, dim), nn.LayerNorm(dim),
                                       nn.Dropout(config.dropout), nn.ReLU())
        else:
            self.embed = nn.Sequential(nn.Identity())
        self.pos_dropout = nn.Dropout(config.positional_dropout)
        self.encoders = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_blocks))
        if config.normalize_before:
            self.after_norm = nn.LayerNorm(dim)
        self._table: Optional[torch.Tensor] = None

    def _positions(self, num_frames: int, device) -> torch.Tensor:
        limit = _MAX_FRAMES[self.config.pos_enc]
        if num_frames > limit:
            raise ValueError(f"audio clip too long for VITA's audio encoder: {num_frames} encoder frames, at most "
                             f"{limit} fit its position table (about {limit * 0.04:.0f} s of audio)")
        if self._table is None or self._table.device != torch.device(device):
            self._table = sinusoid_table(_TABLE_ROWS[self.config.pos_enc], self.config.hidden_size).to(device)
        return self._table[None, :num_frames]

    def _mask(self, valid: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.chunk_size > 0 and not cfg.dynamic_chunks:
            return valid[:, None, :] & chunk_mask(valid.shape[1], cfg.chunk_size, cfg.left_chunks, valid.device)
        return valid[:, None, :]

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mask = self._mask(valid)
        x = self.embed(x) * math.sqrt(self.config.hidden_size)
        pos = self._positions(x.shape[1], x.device)
        if self.config.pos_enc == "abs-enc":
            x = x + pos.to(x.dtype)
        x, pos = self.pos_dropout(x), self.pos_dropout(pos)
        for block in self.encoders:
            x = block(x, mask, pos)
        return self.after_norm(x) if self.config.normalize_before else x


class WhaleEncoder(nn.Module):
    """VITA-1.5's audio encoder behind vitacore's audio-encoder interface.

    Args:
        config: the encoder's settings (:func:`vitacore.model.whale.read_whale_config`).
        cmvn_mean / cmvn_istd: the global CMVN statistics, ``(input_dim,)``.
    """

    def __init__(self, config: WhaleEncoderConfig, cmvn_mean: torch.Tensor, cmvn_istd: torch.Tensor):
        super().__init__()
        self.config = config
        self.global_cmvn = GlobalCmvn(cmvn_mean, cmvn_istd)
        self.enc = nn.ModuleList([Subsampling(config), Transformer(config)])
        self.source = ""  # where the encoder came from (reported, and recorded in exports)
        self.fbank_settings = None  # the features it reads (vitacore.data.FbankSettings)
        self.config_files: dict[str, bytes] = {}  # train.yaml and global_cmvn as read

    def save_config(self, directory: str) -> None:
        """Write the folder's config files (no weights) to ``directory``."""
        os.makedirs(directory, exist_ok=True)
        for name, data in self.config_files.items():
            with open(os.path.join(directory, name), "wb") as fh:
                fh.write(data)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_mel_bins(self) -> int:
        return self.config.input_dim

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``(B, T, mel)`` fbank features; return ``(B, T4, D)`` states and each clip's valid count.

        Raises:
            ValueError: fewer than 7 frames, or a clip past the position table.
        """
        if features.shape[1] < MIN_FRAMES:
            raise ValueError(f"VITA's audio encoder needs at least {MIN_FRAMES} fbank frames (75 ms), got "
                             f"{features.shape[1]}")
        valid = torch.arange(features.shape[1], device=features.device)[None, :] < lengths[:, None]
        x = self.global_cmvn(features.to(self.global_cmvn.mean.dtype))
        x = x.to(self.enc[0].core.out[0].weight.dtype)
        x, valid = self.enc[0](x, valid)
        return self.enc[1](x, valid), valid.sum(dim=1)
