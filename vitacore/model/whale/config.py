"""``train.yaml`` of VITA's own audio encoder ("whale"), read into typed settings.

VITA builds the encoder from the yaml's ``encoder_conf`` (an argparse namespace filled from
``overview_conf`` and one ``para_conf`` entry per component), the wrapper from ``model_conf`` and
the features from ``dataset_conf``. A key the yaml leaves out takes the default VITA's argparse
gives it, so a released yaml reads the same here as there. Anything vitacore does not build (other
components, input layers, feed-forward types) is refused with the yaml field that asks for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from vitacore.data.kaldi_fbank import FbankSettings
from vitacore.model.audio_adapters import ADAPTER_KINDS

CONFIG_FILE = "train.yaml"

# VITA's argparse defaults for keys a yaml leaves out (whale/module/component/*.py, encoder.py).
_ENCODER_DEFAULTS = {"encoder_input_dim": 256, "encoder_output_dim": 256, "encoder_layer_config": "tdnn-dtc"}
_SUBSAMPLING_DEFAULTS = {"subsampling_rate": 4, "subsampling_input_dim": 256, "subsampling_output_dim": 256,
                         "subsampling_dropout_rate": 0.1}
_TRANSFORMER_DEFAULTS = {
    "transformer_input_dim": 256, "transformer_output_dim": 4, "transformer_attention_dim": 256,
    "transformer_attention_heads": 4, "transformer_linear_units": 1024, "transformer_num_blocks": 6,
    "transformer_dropout_rate": 0.1, "transformer_attention_dropout_rate": 0.0,
    "transformer_positional_dropout_rate": 0.1, "transformer_input_layer": "linear",
    "transformer_pos_enc_class": "abs-enc", "transformer_normalize_before": True, "transformer_concat_after": False,
    "transformer_positionwise_layer_type": "linear", "transformer_positionwise_conv_kernel_size": 1,
    "transformer_chunk_size": -1, "transformer_left_chunks": -1, "transformer_dynamic_chunks": True,
}
# The keyword arguments VITA's audioEncoder wrapper accepts (model_conf); any other is an error there.
_MODEL_CONF_KEYS = frozenset({
    "llm_path", "freeze_llm", "enc_out_dim", "llm_embed_dim", "kernel_size", "IGNORE_ID", "adpter_type",
    "add_audio_bos_eos", "task_num", "task_before_audio", "task_type", "freeze_encoder", "freeze_adpter",
    "audio_prompt_finetune", "audio_prompt_num", "activation_func", "norm", "chat_template",
})


@dataclass(frozen=True)
class WhaleEncoderConfig:
    """The subsampling + transformer encoder (``encoder-layer-config: subsampling-transformer``).

    Attributes:
        input_dim: fbank bins into the subsampling (``subsampling-input-dim``).
        subsampling_dim: the subsampling's output width (``subsampling-output-dim``).
        hidden_size: the transformer's width D (``transformer-attention-dim``), the encoder's output.
        num_blocks / num_heads / ffn_size: transformer depth, heads and feed-forward width.
        dropout / attention_dropout / positional_dropout: VITA's three dropout rates.
        input_layer: ``linear`` (Linear -> LayerNorm -> Dropout -> ReLU) or ``none``.
        pos_enc: ``rel-enc`` (relative-position attention terms) or ``abs-enc`` (sinusoids added).
        normalize_before: pre-norm blocks with a final ``after_norm``; False: post-norm.
        chunk_size / left_chunks: static chunked attention (chunk_size <= 0: full attention).
        dynamic_chunks: the yaml asks for VITA's random chunk sizes; vitacore uses full attention.
    """

    input_dim: int
    subsampling_dim: int
    hidden_size: int
    num_blocks: int
    num_heads: int
    ffn_size: int
    dropout: float
    attention_dropout: float
    positional_dropout: float
    input_layer: str
    pos_enc: str
    normalize_before: bool
    chunk_size: int
    left_chunks: int
    dynamic_chunks: bool


@dataclass(frozen=True)
class WhaleAdapterConfig:
    """The adapter from encoder states to LLM embeddings (``model_conf``).

    Attributes:
        kind: ``subsampling`` (stride 2), ``cnn`` or ``linear`` (no time reduction).
        kernel_size / norm / activation: ``kernel_size``, ``norm`` (``layer``/``batch``), ``activation_func``.
        enc_out_dim / llm_embed_dim: input and output widths.
    """

    kind: str
    kernel_size: int
    norm: str
    activation: str
    enc_out_dim: int
    llm_embed_dim: int

    @property
    def time_stride(self) -> int:
        """Encoder states per LLM token."""
        return 2 if self.kind == "subsampling" else 1


@dataclass(frozen=True)
class WhaleConfig:
    """Everything ``train.yaml`` says about the encoder, the adapter, the features and the CMVN file."""

    encoder: WhaleEncoderConfig
    adapter: WhaleAdapterConfig
    features: FbankSettings
    cmvn_is_json: Optional[bool]  # None: the yaml does not say; the file's first byte decides


def _normalized(section: Any, where: str) -> dict:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a mapping, got {type(section).__name__}")
    # VITA turns '-' into '_' before matching argparse names, so both spellings mean the same.
    return {str(key).replace("-", "_"): value for key, value in section.items()}


def _number(values: dict, key: str, where: str, kind=int):
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ValueError(f"{where}.{key.replace('_', '-')}: expected {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r}")
    return kind(value)


def _flag(value) -> bool:
    if isinstance(value, str):  # argparse's strtobool
        return value.strip().lower() in ("y", "yes", "t", "true", "on", "1")
    return bool(value)


def _encoder_config(raw: dict, where: str) -> WhaleEncoderConfig:
    conf = raw.get("encoder_conf")
    if not isinstance(conf, dict):
        raise ValueError(f"{where}: no encoder_conf mapping; is this VITA's audio encoder train.yaml?")
    values = {**_ENCODER_DEFAULTS, **_SUBSAMPLING_DEFAULTS, **_TRANSFORMER_DEFAULTS,
              **_normalized(conf.get("overview_conf"), f"{where}: encoder_conf.overview_conf")}
    layers = str(values["encoder_layer_config"]).split("-")
    para_conf = conf.get("para_conf") or {}
    components = []
    for name in layers:
        kind = name.split("_")[0]
        if kind not in ("subsampling", "transformer"):
            raise ValueError(f"{where}: encoder_conf.overview_conf.encoder-layer-config {'-'.join(layers)!r} has "
                             f"component {name!r}; vitacore builds VITA-1.5's subsampling-transformer encoder only "
                             "(mamba, fsmn, dtc, tdnn are not supported)")
        if name not in para_conf:
            raise ValueError(f"{where}: encoder_conf.para_conf has no {name!r} entry for the component "
                             "encoder-layer-config names")
        values.update(_normalized(para_conf[name], f"{where}: encoder_conf.para_conf.{name}"))
        components.append(kind)
    if components != ["subsampling", "transformer"]:
        raise ValueError(f"{where}: encoder_conf.overview_conf.encoder-layer-config {'-'.join(layers)!r}: vitacore "
                         "builds exactly 'subsampling-transformer' (VITA-1.5's encoder)")
    sub, trans = f"{where}: encoder_conf.para_conf.subsampling", f"{where}: encoder_conf.para_conf.transformer"
    if _number(values, "subsampling_rate", sub) != 4:
        raise ValueError(f"{sub}.subsampling-rate {values['subsampling_rate']!r}: VITA builds only rate 4")
    checks = {
        "transformer_input_layer": ("linear", "none"),
        "transformer_pos_enc_class": ("rel-enc", "abs-enc"),
        "transformer_positionwise_layer_type": ("linear",),
    }
    for key, allowed in checks.items():
        if values[key] not in allowed:
            raise ValueError(f"{trans}.{key.replace('_', '-')} {values[key]!r} is not "
                             f"supported; vitacore builds {' or '.join(allowed)}")
    if _flag(values["transformer_concat_after"]):
        raise ValueError(f"{trans}.transformer-concat-after true is not supported (VITA-1.5's encoder adds)")
    dim = _number(values, "transformer_attention_dim", trans)
    chain = [("encoder-input-dim", values["encoder_input_dim"], "subsampling-input-dim",
              values["subsampling_input_dim"]),
             ("subsampling-output-dim", values["subsampling_output_dim"], "transformer-input-dim",
              values["transformer_input_dim"]),
             ("transformer-output-dim", values["transformer_output_dim"], "encoder-output-dim",
              values["encoder_output_dim"]),
             ("transformer-attention-dim", dim, "transformer-output-dim", values["transformer_output_dim"])]
    for left, left_value, right, right_value in chain:
        if left_value != right_value:
            raise ValueError(f"{where}: encoder_conf {left} ({left_value}) must equal {right} ({right_value})")
    if values["transformer_input_layer"] == "none" and values["transformer_input_dim"] != dim:
        raise ValueError(f"{trans}: with transformer-input-layer none, transformer-input-dim "
                         f"({values['transformer_input_dim']}) must equal transformer-attention-dim ({dim})")
    heads = _number(values, "transformer_attention_heads", trans)
    if dim % heads:
        raise ValueError(f"{trans}.transformer-attention-heads {heads} does not divide attention-dim {dim}")
    return WhaleEncoderConfig(
        input_dim=_number(values, "subsampling_input_dim", sub),
        subsampling_dim=_number(values, "subsampling_output_dim", sub), hidden_size=dim,
        num_blocks=_number(values, "transformer_num_blocks", trans), num_heads=heads,
        ffn_size=_number(values, "transformer_linear_units", trans),
        dropout=_number(values, "transformer_dropout_rate", trans, float),
        attention_dropout=_number(values, "transformer_attention_dropout_rate", trans, float),
        positional_dropout=_number(values, "transformer_positional_dropout_rate", trans, float),
        input_layer=values["transformer_input_layer"], pos_enc=values["transformer_pos_enc_class"],
        normalize_before=_flag(values["transformer_normalize_before"]),
        chunk_size=_number(values, "transformer_chunk_size", trans),
        left_chunks=_number(values, "transformer_left_chunks", trans),
        dynamic_chunks=_flag(values["transformer_dynamic_chunks"]),
    )


def _adapter_config(raw: dict, where: str, encoder: WhaleEncoderConfig) -> WhaleAdapterConfig:
    conf = raw.get("model_conf") or {}
    if not isinstance(conf, dict):
        raise ValueError(f"{where}: model_conf must be a mapping")
    unknown = sorted(set(conf) - _MODEL_CONF_KEYS)
    if unknown:
        raise ValueError(f"{where}: model_conf has keys VITA's audio encoder does not take: {unknown}")
    if _flag(conf.get("add_audio_bos_eos", False)):
        raise ValueError(f"{where}: model_conf.add_audio_bos_eos true is broken in VITA (its task embeddings are "
                         "never built) and not supported; set it to false")
    values = {"enc_out_dim": 512, "llm_embed_dim": 4096, "kernel_size": 3, "adpter_type": "cnn",
              "activation_func": "relu", "norm": "batch", **conf}
    kind = values["adpter_type"]
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"{where}: model_conf.adpter_type {kind!r} is not one of {', '.join(ADAPTER_KINDS)}")
    if kind == "subsampling" and values["norm"] not in ("layer", "batch"):
        raise ValueError(f"{where}: model_conf.norm {values['norm']!r}: VITA's subsampling adapter takes "
                         "'layer' or 'batch'")
    enc_out = _number(values, "enc_out_dim", f"{where}: model_conf")
    if enc_out != encoder.hidden_size:
        raise ValueError(f"{where}: model_conf.enc_out_dim {enc_out} differs from the encoder's output width "
                         f"{encoder.hidden_size} (encoder-output-dim)")
    return WhaleAdapterConfig(kind=kind, kernel_size=_number(values, "kernel_size", f"{where}: model_conf"),
                              norm=values["norm"], activation=values["activation_func"], enc_out_dim=enc_out,
                              llm_embed_dim=_number(values, "llm_embed_dim", f"{where}: model_conf"))


def _feature_settings(raw: dict, where: str, encoder: WhaleEncoderConfig) -> FbankSettings:
    dataset = raw.get("dataset_conf") or {}
    fbank = dataset.get("fbank_conf") if isinstance(dataset, dict) else None
    if not isinstance(fbank, dict):
        raise ValueError(f"{where}: no dataset_conf.fbank_conf (num_mel_bins, frame_length, frame_shift, dither)")
    # VITA reads each of these on every clip (a KeyError there), so none has a default here either.
    missing = [key for key in ("num_mel_bins", "frame_length", "frame_shift", "dither") if key not in fbank]
    if missing:
        raise ValueError(f"{where}: dataset_conf.fbank_conf lacks {missing}")
    resample = dataset.get("resample_conf")
    if not isinstance(resample, dict) or "resample_rate" not in resample:
        raise ValueError(f"{where}: no dataset_conf.resample_conf.resample_rate (the rate VITA resamples audio to)")
    settings = FbankSettings(
        sample_rate=_number(resample, "resample_rate", f"{where}: dataset_conf.resample_conf"),
        num_mel_bins=_number(fbank, "num_mel_bins", f"{where}: dataset_conf.fbank_conf"),
        frame_length_ms=_number(fbank, "frame_length", f"{where}: dataset_conf.fbank_conf", float),
        frame_shift_ms=_number(fbank, "frame_shift", f"{where}: dataset_conf.fbank_conf", float),
        dither=_number(fbank, "dither", f"{where}: dataset_conf.fbank_conf", float),
    )
    if settings.num_mel_bins != encoder.input_dim:
        raise ValueError(f"{where}: dataset_conf.fbank_conf.num_mel_bins {settings.num_mel_bins} differs from the "
                         f"encoder's input width {encoder.input_dim} (subsampling-input-dim)")
    return settings


def read_whale_config(folder: str) -> WhaleConfig:
    """Read ``folder/train.yaml``.

    Raises:
        FileNotFoundError: no train.yaml in ``folder``.
        ValueError: a setting vitacore does not build, or one that contradicts another; the message
            names the file and the yaml field.
    """
    import yaml

    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--audio_encoder {folder!r}: no {CONFIG_FILE}")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not readable YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    encoder = _encoder_config(raw, path)
    if "input_dim" in raw and raw["input_dim"] != encoder.input_dim:
        raise ValueError(f"{path}: input_dim {raw['input_dim']} differs from encoder-input-dim {encoder.input_dim}")
    is_json = raw.get("is_json_cmvn")
    return WhaleConfig(encoder=encoder, adapter=_adapter_config(raw, path, encoder),
                       features=_feature_settings(raw, path, encoder),
                       cmvn_is_json=None if is_json is None else _flag(is_json))
