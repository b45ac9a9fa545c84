"""An independent functional reference of VITA's audio encoder ("whale") + adapter forward, in eval mode.

Written from VITA's source facts (``vita/model/multimodal_encoder/whale/``), never from vitacore, and operating on
the ``final.pt`` state dict directly with plain torch functions:

- ``GlobalCMVN``: ``(x - mean) * istd`` on every frame, padded ones included.
- ``Conv2dSubsampling4``: ``Conv2d(1, D, 3, 2)`` -> ReLU -> ``Conv2d(D, D, 3, 2)`` -> ReLU, flatten ``(B, T4, D * F)``
  channel-major, ``Linear``; the mask becomes ``mask[:, :, 2::2][:, :, 2::2]``.
- ``Transformer``: the attention mask is built from the subsampled mask *before* the embedding
  (``add_optional_chunk_mask``: ``(B, 1, T)`` for full attention, ``(B, T, T)`` for static chunks from
  ``subsequent_chunk_mask``); ``embed`` = Linear -> LayerNorm -> (Dropout) -> ReLU; ``rel-enc``: ``x * sqrt(D)`` and a
  5000-row sin/cos table that is *not* added to ``x``; ``abs-enc``: ``x * sqrt(D) + pe`` (1500-row table).
- ``MultiHeadedAttention``: ``rel-enc`` scores ``((q + u) k^T + (q + v) p^T) / sqrt(d_k)`` with ``p = linear_pos(pe)``
  and no ``rel_shift``; ``abs-enc`` ``q k^T / sqrt(d_k)``; masked scores filled with float16's minimum (-65504),
  softmax, masked weights set to 0.
- Pre-norm blocks ``x + MHA(norm1 x)``, ``x + w_2(relu(w_1 norm2 x))``, then ``after_norm`` (LayerNorm eps 1e-5).
- Adapters ``subsampling`` (``CNNSubsampling``), ``cnn`` (``CNNAdapter``), ``linear`` (``LinearAdapter``).
"""

import math

import torch
import torch.nn.functional as F

FP16_MIN = -65504.0  # float(torch.finfo(torch.float16).min), VITA's fill value for masked scores
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, as VITA builds its encoder norms
ADAPTER_EPS = 1e-3  # VITA's adapter BatchNorm1d / LayerNorm eps
REL_TABLE_ROWS = 5000  # RelPositionalEncoding's max_len
ABS_TABLE_ROWS = 1500  # PositionalEncoding's max_len


def sinusoid_table(rows, dim):
    """VITA's ``PositionalEncoding.pe`` (float32): sin on even columns, cos on odd ones."""
    position = torch.arange(0, rows, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    table = torch.zeros(rows, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


def subsampled_mask(mask):
    """The frame mask after ``Conv2dSubsampling4``: ``mask[:, 2::2][:, 2::2]`` (output t <-> input frame 4t + 6)."""
    return mask[:, 2::2][:, 2::2]


def chunk_mask(length, chunk_size, left_chunks):
    """VITA's ``subsequent_chunk_mask``: row i sees ``[max((i // c - left) * c, 0), min((i // c + 1) * c, T))``."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        start = 0 if left_chunks < 0 else max((i // chunk_size - left_chunks) * chunk_size, 0)
        allowed[i, start:min((i // chunk_size + 1) * chunk_size, length)] = True
    return allowed


def attention_mask(mask4, chunk_size, left_chunks):
    """``add_optional_chunk_mask`` without dynamic chunks: ``(B, 1, T)`` keys only, or ``(B, T, T)`` with chunks."""
    keys = mask4.unsqueeze(1)
    if chunk_size > 0:
        return keys & chunk_mask(mask4.shape[1], chunk_size, left_chunks).unsqueeze(0)
    return keys


def _linear(state, prefix, x):
    return F.linear(x, state[prefix + ".weight"], state.get(prefix + ".bias"))


def _layer_norm(state, prefix, x, eps=LAYER_NORM_EPS):
    return F.layer_norm(x, (x.shape[-1],), state[prefix + ".weight"], state[prefix + ".bias"], eps)


def _attention(state, prefix, x, allowed, pos, num_heads, rel):
    """VITA's ``MultiHeadedAttention.forward`` in eval mode (no dropout)."""
    batch, time, dim = x.shape
    d_k = dim // num_heads

    def heads(t):
        return t.view(t.shape[0], -1, num_heads, d_k).transpose(1, 2)  # (B, H, T, d_k)

    q = heads(_linear(state, prefix + ".linear_q", x))
    k = heads(_linear(state, prefix + ".linear_k", x))
    v = heads(_linear(state, prefix + ".linear_v", x))
    if rel:
        p = heads(F.linear(pos.to(x.dtype), state[prefix + ".linear_pos.weight"]))  # (1, H, T, d_k)
        bias_u = state[prefix + ".pos_bias_u"].unsqueeze(1)  # (H, 1, d_k)
        bias_v = state[prefix + ".pos_bias_v"].unsqueeze(1)
        content = torch.matmul(q + bias_u, k.transpose(-2, -1))
        position = torch.matmul(q + bias_v, p.transpose(-2, -1))  # query content x absolute key position
        scores = (content + position) / math.sqrt(d_k)
    else:
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d_k)
    blocked = ~allowed.unsqueeze(1)  # (B, 1, T or 1, T)
    weights = torch.softmax(scores.masked_fill(blocked, FP16_MIN), dim=-1).masked_fill(blocked, 0.0)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, time, dim)
    return _linear(state, prefix + ".linear_out", out)


def reference_encoder(state, features, lengths, *, pos_enc="rel-enc", chunk_size=-1, left_chunks=-1,
                      num_heads=None):
    """VITA's ``whaleEncoder.forward`` (``subsampling-transformer``) on ``final.pt``'s ``encoder.*`` tensors.

    Args:
        state: ``final.pt``'s dict (keys with the ``encoder.`` prefix).
        features: ``(B, T, mel)`` fbank, zero-padded.
        lengths: ``(B,)`` valid frames.
        pos_enc: ``rel-enc`` or ``abs-enc``.
        chunk_size: Static chunk size (``<= 0``: full attention over valid frames).
        left_chunks: Chunks to the left a chunk sees (``< 0``: all).
        num_heads: Attention heads; read from ``pos_bias_u``'s shape when omitted (``rel-enc`` only).

    Returns:
        ``(states (B, T4, D), mask4 (B, T4) bool)``.
    """
    state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    dtype = state["enc.0.core.conv.0.weight"].dtype
    x = features.to(dtype)
    time = x.shape[1]
    mask = torch.arange(time).unsqueeze(0) < lengths.unsqueeze(1)
    if "global_cmvn.mean" in state:
        x = (x - state["global_cmvn.mean"]) * state["global_cmvn.istd"]

    # Conv2dSubsampling4
    x = F.relu(F.conv2d(x.unsqueeze(1), state["enc.0.core.conv.0.weight"], state["enc.0.core.conv.0.bias"], 2))
    x = F.relu(F.conv2d(x, state["enc.0.core.conv.2.weight"], state["enc.0.core.conv.2.bias"], 2))
    batch, channels, time4, freq = x.shape
    x = x.permute(0, 2, 1, 3).reshape(batch, time4, channels * freq)  # channel-major, then frequency
    x = _linear(state, "enc.0.core.out.0", x)
    mask4 = subsampled_mask(mask)
    assert mask4.shape[1] == time4

    # Transformer
    rel = pos_enc == "rel-enc"
    if rel and num_heads is None:
        num_heads = state["enc.1.encoders.0.self_attn.pos_bias_u"].shape[0]
    allowed = attention_mask(mask4, chunk_size, left_chunks)
    x = F.relu(_layer_norm(state, "enc.1.embed.1", _linear(state, "enc.1.embed.0", x)))
    dim = x.shape[-1]
    if rel:
        pos = sinusoid_table(REL_TABLE_ROWS, dim)[:time4].unsqueeze(0)
        x = x * math.sqrt(dim)
    elif pos_enc == "abs-enc":
        assert time4 < ABS_TABLE_ROWS, "VITA asserts offset + T < max_len (1500)"
        pos = sinusoid_table(ABS_TABLE_ROWS, dim)[:time4].unsqueeze(0)
        x = x * math.sqrt(dim) + pos.to(x.dtype)
    else:
        raise ValueError(pos_enc)
    i = 0
    while f"enc.1.encoders.{i}.norm1.weight" in state:
        block = f"enc.1.encoders.{i}"
        x = x + _attention(state, block + ".self_attn", _layer_norm(state, block + ".norm1", x), allowed, pos,
                           num_heads, rel)
        hidden = F.relu(_linear(state, block + ".feed_forward.w_1", _layer_norm(state, block + ".norm2", x)))
        x = x + _linear(state, block + ".feed_forward.w_2", hidden)
        i += 1
    return _layer_norm(state, "enc.1.after_norm", x), mask4


def _batch_norm(state, prefix, x):
    return F.batch_norm(x, state[prefix + ".running_mean"], state[prefix + ".running_var"],
                        state[prefix + ".weight"], state[prefix + ".bias"], False, 0.0, ADAPTER_EPS)


def reference_adapter(state, states, mask4, *, adapter_type="subsampling", kernel_size=5, norm="layer",
                      activation="gelu"):
    """VITA's adapter (``audioEncoder.adpter``) on ``final.pt``'s ``adpter.*`` tensors, eval mode.

    Args:
        state: ``final.pt``'s dict (keys with the ``adpter.`` prefix).
        states: ``(B, T4, D)`` encoder output (padded frames need not be zero: VITA zeroes them here).
        mask4: ``(B, T4)`` bool, the encoder's output mask.
        adapter_type: ``subsampling``, ``cnn`` or ``linear``.
        kernel_size: The adapter's kernel.
        norm: ``layer`` or ``batch`` (``subsampling`` only; ``cnn`` is always BatchNorm).
        activation: ``gelu`` (erf GELU) or anything else (ReLU); ``subsampling`` only.

    Returns:
        ``(embeds (B, T', L), out_mask (B, T') bool)``.
    """
    state = {k[len("adpter."):]: v for k, v in state.items() if k.startswith("adpter.")}
    if adapter_type == "linear":  # LinearAdapter: no zeroing, no time change
        return _linear(state, "adpter", states), mask4
    x = states.transpose(1, 2).masked_fill(~mask4.unsqueeze(1), 0.0)  # (B, D, T4)
    if adapter_type == "subsampling":
        x = F.conv1d(F.pad(x, (0, kernel_size - 1)), state["conv1d2.weight"], state["conv1d2.bias"], stride=2)
        if norm == "layer":
            x = _layer_norm(state, "bn2", x.transpose(1, 2), ADAPTER_EPS).transpose(1, 2)
        elif norm == "batch":
            x = _batch_norm(state, "bn2", x)
        else:
            raise ValueError(norm)
        x = F.gelu(x) if activation == "gelu" else F.relu(x)
        return _linear(state, "project", x.transpose(1, 2)), mask4[:, 0::2]
    if adapter_type == "cnn":
        x = F.conv1d(F.pad(x, (kernel_size - 1, 0)), state["conv1d1.weight"], state["conv1d1.bias"])
        x = F.relu(_batch_norm(state, "bn1", x))
        x = F.conv1d(F.pad(x, (kernel_size - 1, 0)), state["conv1d2.weight"], state["conv1d2.bias"])
        x = F.relu(_batch_norm(state, "bn2", x))
        return _linear(state, "project", x.transpose(1, 2)), mask4
    raise ValueError(adapter_type)


def reference_forward(state, features, lengths, *, pos_enc="rel-enc", chunk_size=-1, left_chunks=-1,
                      adapter_type="subsampling", kernel_size=5, norm="layer", activation="gelu", num_heads=None,
                      prompt=False):
    """VITA's ``audioEncoder.forward`` in eval mode: encoder, adapter, optional prompt embeddings first.

    Args:
        state: ``final.pt``'s dict.
        features: ``(B, T, mel)`` fbank, zero-padded.
        lengths: ``(B,)`` valid frames.
        pos_enc: See :func:`reference_encoder`.
        chunk_size: See :func:`reference_encoder`.
        left_chunks: See :func:`reference_encoder`.
        adapter_type: See :func:`reference_adapter`.
        kernel_size: See :func:`reference_adapter`.
        norm: See :func:`reference_adapter`.
        activation: See :func:`reference_adapter`.
        num_heads: See :func:`reference_encoder`.
        prompt: Prepend ``prompt_embeddings.weight`` (VITA's ``audio_prompt_finetune``).

    Returns:
        ``(embeds (B, P + T', L), out_mask (B, T') bool)``; like VITA, the mask does not cover the prompt rows.
    """
    states, mask4 = reference_encoder(state, features, lengths, pos_enc=pos_enc, chunk_size=chunk_size,
                                      left_chunks=left_chunks, num_heads=num_heads)
    embeds, out_mask = reference_adapter(state, states, mask4, adapter_type=adapter_type, kernel_size=kernel_size,
                                         norm=norm, activation=activation)
    if prompt:
        rows = state["prompt_embeddings.weight"].to(embeds.dtype)
        embeds = torch.cat([rows.unsqueeze(0).expand(embeds.shape[0], -1, -1), embeds], dim=1)
    return embeds, out_mask
