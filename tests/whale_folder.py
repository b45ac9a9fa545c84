"""Write a VITA-layout audio encoder folder ("whale": ``train.yaml``, ``global_cmvn``, ``final.pt``) for tests.

Written from the documented layout only, never from vitacore:

- ``train.yaml`` has the key skeleton and spellings of the released Freeze-Omni ``checkpoints/audiollm/train.yaml``
  (the same encoder code as VITA-1.5): top-level ``input_dim``, ``is_json_cmvn``, ``cmvn_file`` (null, the builder
  fills it), ``dataset_conf`` (``fbank_conf``, ``resample_conf``, ...), ``encoder_conf: {overview_conf, para_conf}``
  with hyphenated keys (and the real mixed spellings ``transformer-chunk_size`` / ``transformer-left_chunks``),
  ``model_conf``. VITA passes ``model_conf`` as keyword arguments to its ``audioEncoder``, so the ``"vita"`` layout
  writes only keys that constructor accepts; the ``"freeze-omni"`` layout writes Freeze-Omni's own ``model_conf``
  (keys VITA's constructor rejects), as released. Keys are sorted, as ``yaml.dump`` wrote the real file.
- ``global_cmvn``: JSON ``{"mean_stat", "var_stat", "frame_num"}`` or Kaldi text ``[ sums N`` / ``squares 0 ]``.
- ``final.pt``: ``torch.save`` of a plain state dict with VITA's key names (the misspelt ``adpter.`` included) and
  random tensors of VITA's shapes.
"""

import json
import math
import os
from dataclasses import dataclass, field

import torch
import yaml

DELETE = object()
"""Value for :func:`edit_yaml` that removes a key instead of setting it."""

CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<audio><|im_end|>\n"
    "<|im_start|>assistant\n"
)


@dataclass
class WhaleFolder:
    """What :func:`write_vita_audio_encoder` wrote.

    Attributes:
        path: The folder.
        yaml_path: ``train.yaml``.
        cmvn_path: ``global_cmvn``.
        checkpoint_path: ``final.pt``.
        num_mel_bins: Fbank bins (``input_dim``).
        hidden: Encoder width D (subsampling output, attention dim, ``enc_out_dim``).
        num_blocks: Transformer blocks.
        num_heads: Attention heads.
        ffn: Feed-forward width.
        llm_embed_dim: Adapter output width L.
        adapter_type: ``subsampling``, ``cnn`` or ``linear``.
        kernel_size: Adapter kernel.
        norm: Adapter norm (``layer`` or ``batch``).
        activation: Adapter activation (``gelu`` or ``relu``).
        pos_enc: ``rel-enc`` or ``abs-enc``.
        chunk_size: ``transformer-chunk_size``.
        left_chunks: ``transformer-left_chunks``.
        prompt_num: Rows of ``prompt_embeddings.weight`` (0: none).
        config: The dict written to ``train.yaml``.
        cmvn_stats: ``(mean_stat, var_stat, frame_num)`` written to ``global_cmvn``.
        state: The dict saved as ``final.pt``.
    """

    path: str
    yaml_path: str
    cmvn_path: str
    checkpoint_path: str
    num_mel_bins: int
    hidden: int
    num_blocks: int
    num_heads: int
    ffn: int
    llm_embed_dim: int
    adapter_type: str
    kernel_size: int
    norm: str
    activation: str
    pos_enc: str
    chunk_size: int
    left_chunks: int
    prompt_num: int
    config: dict = field(repr=False)
    cmvn_stats: tuple = field(repr=False)
    state: dict = field(repr=False)


def vita_cmvn(mean_stat, var_stat, frame_num):
    """VITA's ``load_cmvn`` maths (float64 Python floats, then ``.float()``): mean and istd tensors."""
    means, istds = [], []
    for s, q in zip(mean_stat, var_stat):
        mean = s / frame_num
        var = q / frame_num - mean * mean
        var = max(var, 1.0e-20)
        means.append(mean)
        istds.append(1.0 / math.sqrt(var))
    return torch.tensor(means, dtype=torch.float64).float(), torch.tensor(istds, dtype=torch.float64).float()


def write_cmvn(path, mean_stat, var_stat, frame_num, fmt="json"):
    """Write ``global_cmvn`` as VITA reads it: ``json`` or Kaldi ``text`` (``compute-cmvn-stats --binary=false``)."""
    if fmt == "json":
        with open(path, "w") as f:
            json.dump({"mean_stat": list(mean_stat), "var_stat": list(var_stat), "frame_num": frame_num}, f)
    elif fmt == "kaldi":
        row1 = " ".join(repr(float(v)) for v in mean_stat) + " " + repr(float(frame_num))
        row2 = " ".join(repr(float(v)) for v in var_stat) + " 0"
        with open(path, "w") as f:
            f.write(" [\n  " + row1 + " \n  " + row2 + " ]\n")
    elif fmt == "kaldi-binary":
        with open(path, "wb") as f:
            f.write(b"\x00BDM \x04" + len(mean_stat).to_bytes(4, "little") + b"\x00" * 16)
    else:
        raise ValueError(f"unknown cmvn format {fmt!r}")


def _yaml_config(*, mel, hidden, num_blocks, num_heads, ffn, adapter_type, kernel_size, norm, activation,
                 llm_embed_dim, pos_enc, chunk_size, left_chunks, dynamic_chunks, cmvn_format, dither,
                 resample_rate, layout):
    model_conf = {
        "activation_func": activation, "add_audio_bos_eos": False, "adpter_type": adapter_type,
        "chat_template": CHAT_TEMPLATE, "enc_out_dim": hidden, "freeze_adpter": True, "freeze_encoder": True,
        "freeze_llm": True, "kernel_size": kernel_size, "llm_embed_dim": llm_embed_dim, "llm_path": None,
        "norm": norm, "task_num": 20,
    }
    if layout == "freeze-omni":  # the released Freeze-Omni model_conf: its audioLLM's keys, not VITA's
        model_conf.update({"add_audio_bos_eos": True, "add_prompt_before": True, "chunk_size": 2,
                           "llm_head_num": 28, "num_key_value_heads": 4, "predict_usr_state": 4,
                           "prompt_finetune": True, "prompt_num": 25, "task_type": "prompt_finetune"})
    elif layout != "vita":
        raise ValueError(f"unknown layout {layout!r}")
    return {
        "accum_grad": 1,
        "cmvn_file": None,
        "dataset_conf": {
            "batch_conf": {"batch_size": 4, "batch_type": "chat"},
            "fbank_conf": {"chunk_size": 4, "dither": dither, "frame_length": 25, "frame_shift": 10,
                           "num_mel_bins": mel, "pad_rate": 0.1},
            "filter_conf": {"max_length": 2000, "max_output_input_ratio": 102400, "max_total_num": 1000,
                            "min_length": 10, "min_output_input_ratio": 0, "token_max_length": 102400,
                            "token_min_length": 0},
            "parse_multi_rounds": True,
            "resample_conf": {"resample_rate": resample_rate},
            "shuf_list": True, "shuffle": False, "sort": False, "spec_aug": True,
            "spec_aug_conf": {"max_f": 10, "max_t": 20, "num_f_mask": 1, "num_t_mask": 1},
            "spec_sub": False, "spec_sub_conf": {"max_t": 30, "num_t_sub": 3}, "speed_perturb": False,
            "split_num": 1, "tokenize_char": False, "tokenize_conf": {"eod_id": 151645}, "tokenize_type": "Qwen",
            "tokenizer_path": None,
        },
        "ds_dtype": "bf16",
        "encoder_conf": {
            "overview_conf": {"encoder-input-dim": mel, "encoder-layer-config": "subsampling-transformer",
                              "encoder-output-dim": hidden},
            "para_conf": {
                "subsampling": {"subsampling-dropout-rate": 0.1, "subsampling-input-dim": mel,
                                "subsampling-output-dim": hidden, "subsampling-rate": 4},
                "transformer": {
                    "transformer-attention-dim": hidden, "transformer-attention-dropout-rate": 0.0,
                    "transformer-attention-heads": num_heads, "transformer-chunk_size": chunk_size,
                    "transformer-concat-after": False, "transformer-dropout-rate": 0.1,
                    "transformer-dynamic-chunks": dynamic_chunks, "transformer-input-dim": hidden,
                    "transformer-input-layer": "linear", "transformer-left_chunks": left_chunks,
                    "transformer-linear-units": ffn, "transformer-normalize-before": True,
                    "transformer-num-blocks": num_blocks, "transformer-output-dim": hidden,
                    "transformer-pos-enc-class": pos_enc, "transformer-positional-dropout-rate": 0.1,
                    "transformer-positionwise-layer-type": "linear",
                },
            },
        },
        "grad_clip": 5.0,
        "input_dim": mel,
        "is_json_cmvn": cmvn_format == "json",
        "log_interval": 100,
        "max_epoch": 100,
        "model_conf": model_conf,
        "optim": "adamw",
        "optim_conf": {"betas": [0.9, 0.99], "eps": 1.0e-6, "lr": 0.0006, "weight_decay": 0.01},
        "output_dim": 5538,
        "scheduler": "warmuplr",
        "scheduler_conf": {"warmup_steps": 200},
    }


def _state_dict(g, *, mel, hidden, num_blocks, num_heads, ffn, adapter_type, kernel_size, norm, llm_embed_dim,
                pos_enc, prompt_num, cmvn_mean, cmvn_istd):
    """VITA's ``audioEncoder`` state dict keys (registration order) with random tensors of VITA's shapes."""

    def linear(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f), 0.1 * torch.randn(out_f, generator=g)

    def conv(out_c, in_c, *kernel):
        fan_in = in_c * math.prod(kernel)
        return (torch.randn(out_c, in_c, *kernel, generator=g) / math.sqrt(fan_in),
                0.1 * torch.randn(out_c, generator=g))

    def layer_norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g), 0.1 * torch.randn(n, generator=g)

    def batch_norm(n):
        weight, bias = layer_norm(n)
        return {"weight": weight, "bias": bias, "running_mean": 0.2 * torch.randn(n, generator=g),
                "running_var": 0.5 + torch.rand(n, generator=g), "num_batches_tracked": torch.tensor(1000)}

    state = {}

    def put(prefix, **tensors):
        for name, tensor in tensors.items():
            state[f"{prefix}.{name}"] = tensor

    def put_pair(prefix, pair):
        put(prefix, weight=pair[0], bias=pair[1])

    freq = ((mel - 1) // 2 - 1) // 2
    put_pair("encoder.enc.0.core.conv.0", conv(hidden, 1, 3, 3))
    put_pair("encoder.enc.0.core.conv.2", conv(hidden, hidden, 3, 3))
    put_pair("encoder.enc.0.core.out.0", linear(hidden, hidden * freq))
    put_pair("encoder.enc.1.embed.0", linear(hidden, hidden))
    put_pair("encoder.enc.1.embed.1", layer_norm(hidden))
    for i in range(num_blocks):
        block = f"encoder.enc.1.encoders.{i}"
        if pos_enc == "rel-enc":  # parameters first: pos_bias_u / v, then the Linear sub-modules
            put(f"{block}.self_attn", pos_bias_u=0.3 * torch.randn(num_heads, hidden // num_heads, generator=g),
                pos_bias_v=0.3 * torch.randn(num_heads, hidden // num_heads, generator=g))
        for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
            put_pair(f"{block}.self_attn.{name}", linear(hidden, hidden))
        if pos_enc == "rel-enc":
            put(f"{block}.self_attn.linear_pos", weight=linear(hidden, hidden)[0])
        put_pair(f"{block}.feed_forward.w_1", linear(ffn, hidden))
        put_pair(f"{block}.feed_forward.w_2", linear(hidden, ffn))
        put_pair(f"{block}.norm1", layer_norm(hidden))
        put_pair(f"{block}.norm2", layer_norm(hidden))
    put_pair("encoder.enc.1.after_norm", layer_norm(hidden))
    if cmvn_mean is not None:  # whaleEncoder registers global_cmvn after its components
        put("encoder.global_cmvn", mean=cmvn_mean.clone(), istd=cmvn_istd.clone())

    if adapter_type == "subsampling":
        put_pair("adpter.conv1d2", conv(2 * hidden, hidden, kernel_size))
        if norm == "batch":
            put("adpter.bn2", **batch_norm(2 * hidden))
        else:
            put_pair("adpter.bn2", layer_norm(2 * hidden))
        put_pair("adpter.project", linear(llm_embed_dim, 2 * hidden))
    elif adapter_type == "cnn":
        put_pair("adpter.conv1d1", conv(2 * hidden, hidden, kernel_size))
        put("adpter.bn1", **batch_norm(2 * hidden))
        put_pair("adpter.conv1d2", conv(4 * hidden, 2 * hidden, kernel_size))
        put("adpter.bn2", **batch_norm(4 * hidden))
        put_pair("adpter.project", linear(llm_embed_dim, 4 * hidden))
    elif adapter_type == "linear":
        put_pair("adpter.adpter", linear(llm_embed_dim, hidden))
    else:
        raise ValueError(f"unknown adapter type {adapter_type!r}")
    if prompt_num:
        state["prompt_embeddings.weight"] = torch.randn(prompt_num, llm_embed_dim, generator=g)
    return state


def write_vita_audio_encoder(folder, *, num_mel_bins=80, hidden=32, num_blocks=2, num_heads=4, ffn=64,
                             adapter_type="subsampling", kernel_size=5, norm="layer", activation="gelu",
                             llm_embed_dim=64, pos_enc="rel-enc", chunk_size=-1, left_chunks=-1,
                             dynamic_chunks=False, cmvn_format="json", dither=0.0, resample_rate=16000,
                             prompt_num=0, checkpoint_cmvn="file", layout="vita", seed=0, extra_keys=None,
                             drop_keys=()):
    """Write a VITA audio encoder folder and describe it.

    Args:
        folder: Where to write (created if needed).
        num_mel_bins: Fbank bins (``input_dim``, ``encoder-input-dim``, ``subsampling-input-dim``).
        hidden: Encoder width (``*-output-dim``, ``transformer-attention-dim``, ``enc_out_dim``).
        num_blocks: ``transformer-num-blocks``.
        num_heads: ``transformer-attention-heads``.
        ffn: ``transformer-linear-units``.
        adapter_type: ``adpter_type``: ``subsampling``, ``cnn`` or ``linear``.
        kernel_size: Adapter ``kernel_size``.
        norm: Adapter ``norm`` (``layer`` / ``batch``; ``subsampling`` only).
        activation: Adapter ``activation_func``.
        llm_embed_dim: ``llm_embed_dim``.
        pos_enc: ``transformer-pos-enc-class``.
        chunk_size: ``transformer-chunk_size``.
        left_chunks: ``transformer-left_chunks``.
        dynamic_chunks: ``transformer-dynamic-chunks``.
        cmvn_format: ``json`` (``is_json_cmvn: true``) or ``kaldi`` text.
        dither: ``dataset_conf.fbank_conf.dither``.
        resample_rate: ``dataset_conf.resample_conf.resample_rate``.
        prompt_num: Rows of a ``prompt_embeddings.weight`` in ``final.pt`` (0: none, as released).
        checkpoint_cmvn: ``file``: ``final.pt`` holds the file's mean / istd (as trained); ``other``: different
            values (to see which one wins); ``none``: no ``encoder.global_cmvn.*`` keys.
        layout: ``vita`` (``model_conf`` keys VITA accepts) or ``freeze-omni`` (Freeze-Omni's ``model_conf``).
        seed: Seed of every random tensor and statistic.
        extra_keys: ``final.pt`` entries to add or replace (name -> tensor).
        drop_keys: ``final.pt`` entries to leave out.

    Returns:
        A :class:`WhaleFolder`.
    """
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    frame_num = 1000
    mean = 2.0 + 10.0 * torch.rand(num_mel_bins, generator=g, dtype=torch.float64)
    std = 1.0 + 3.0 * torch.rand(num_mel_bins, generator=g, dtype=torch.float64)
    mean_stat = [float(v) for v in mean * frame_num]
    var_stat = [float(v) for v in (std * std + mean * mean) * frame_num]
    cmvn_path = os.path.join(folder, "global_cmvn")
    write_cmvn(cmvn_path, mean_stat, var_stat, frame_num, cmvn_format)

    cmvn_mean, cmvn_istd = vita_cmvn(mean_stat, var_stat, frame_num)
    if checkpoint_cmvn == "other":
        cmvn_mean = cmvn_mean + 0.5 * torch.randn(num_mel_bins, generator=g)
        cmvn_istd = cmvn_istd * (0.8 + 0.4 * torch.rand(num_mel_bins, generator=g))
    elif checkpoint_cmvn == "none":
        cmvn_mean = cmvn_istd = None
    elif checkpoint_cmvn != "file":
        raise ValueError(f"unknown checkpoint_cmvn {checkpoint_cmvn!r}")

    dims = dict(mel=num_mel_bins, hidden=hidden, num_blocks=num_blocks, num_heads=num_heads, ffn=ffn,
                adapter_type=adapter_type, kernel_size=kernel_size, norm=norm, llm_embed_dim=llm_embed_dim,
                pos_enc=pos_enc)
    config = _yaml_config(**dims, activation=activation, chunk_size=chunk_size, left_chunks=left_chunks,
                          dynamic_chunks=dynamic_chunks, cmvn_format=cmvn_format, dither=dither,
                          resample_rate=resample_rate, layout=layout)
    yaml_path = os.path.join(folder, "train.yaml")
    with open(yaml_path, "w") as f:
        yaml.dump(config, f, default_flow_style=False)

    state = _state_dict(g, **dims, prompt_num=prompt_num, cmvn_mean=cmvn_mean, cmvn_istd=cmvn_istd)
    for key in drop_keys:
        del state[key]
    state.update(extra_keys or {})
    checkpoint_path = os.path.join(folder, "final.pt")
    torch.save(state, checkpoint_path)
    return WhaleFolder(
        path=str(folder), yaml_path=yaml_path, cmvn_path=cmvn_path, checkpoint_path=checkpoint_path,
        num_mel_bins=num_mel_bins, hidden=hidden, num_blocks=num_blocks, num_heads=num_heads, ffn=ffn,
        llm_embed_dim=llm_embed_dim, adapter_type=adapter_type, kernel_size=kernel_size, norm=norm,
        activation=activation, pos_enc=pos_enc, chunk_size=chunk_size, left_chunks=left_chunks,
        prompt_num=prompt_num, config=config, cmvn_stats=(mean_stat, var_stat, frame_num), state=state,
    )


def edit_yaml(folder, changes):
    """Rewrite ``train.yaml`` with ``changes`` (dotted path -> value, or :data:`DELETE`); return the new dict.

    Dotted paths split on ``.`` only, so hyphenated keys stay whole:
    ``"encoder_conf.para_conf.transformer.transformer-pos-enc-class"``.
    """
    path = os.path.join(str(folder), "train.yaml")
    with open(path) as f:
        config = yaml.safe_load(f)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    with open(path, "w") as f:
        yaml.dump(config, f, default_flow_style=False)
    return config
