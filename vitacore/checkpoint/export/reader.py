"""Build a whole ``VitaModel`` from a folder in VITA's layout: a vitacore full export or a VITA checkpoint.

Such a folder's ``config.json`` is the LLM's config plus VITA's multimodal fields (``mm_vision_tower``,
``mm_projector_type``, ...), and its safetensors hold every part under VITA's key names. The LLM comes
from ``AutoModelForCausalLM.from_pretrained(folder)`` (it loads the keys that are its own); the other
parts are constructed from encoder configs, then filled from the same shards through
:func:`vitacore.model.vita_layout.from_vita_name`.

Where an encoder's config comes from, first match wins: ``--vision_tower`` / ``--audio_encoder``;
the export's ``vision_tower/`` / ``audio_encoder/`` folder; the ``mm_vision_tower`` /
``mm_audio_encoder`` path recorded in config.json, when it exists on this machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Optional

import torch
import torch.nn as nn
from safetensors import safe_open

from vitacore.checkpoint.artifacts import load_adapter_file
from vitacore.model.audio import AUDIO_CONFIG_FILE, AudioAdapter, build_audio_encoder
from vitacore.model.families import attention_implementation
from vitacore.model.multimodal import VitaModel
from vitacore.model.projector import build_projector
from vitacore.model.vision import VisionTower, build_vision_tower
from vitacore.model.vita_layout import from_vita_name, is_llm_key
from vitacore.partition import gathered, is_partitioned

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
VISION_SUBFOLDER = "vision_tower"
AUDIO_SUBFOLDER = "audio_encoder"
# VITA's own model types -> the transformers family whose weights they hold.
VITA_MODEL_TYPES = {"vita-Qwen2": "qwen2", "vita-fo-Qwen2": "qwen2", "vita-Mistral": "mistral",
                    "vita-mixtral": "mixtral"}
# VITA's multimodal config fields (VITA_REFERENCE §8); they describe the model, not the LLM.
MULTIMODAL_FIELDS = (
    "mm_vision_tower", "mm_audio_encoder", "mm_projector_type", "mm_hidden_size", "use_mm_proj",
    "image_aspect_ratio", "tokenizer_padding_side", "tokenizer_model_max_length", "freeze_audio_encoder",
    "freeze_audio_encoder_adapter", "audio_prompt_finetune", "audio_prompt_num", "tune_mm_mlp_adapter",
    "tune_audio_mlp_adapter", "audio_state_predictor_tuning", "freeze_mm_mlp_adapter", "mm_projector_lr",
    "use_s2", "unfreeze_vision_tower",
)
PROMPT_KEY = "model.audio_encoder.prompt_embeddings.weight"
STATE_HEAD_PREFIX = "predictor_head."
ADAPTER_CONV_KEY = "model.audio_encoder.adpter.conv1d2.weight"


def read_export_config(path: Optional[str]) -> Optional[dict]:
    """``path``'s config.json when it describes a whole VITA-layout model (it has ``mm_vision_tower``
    or a ``vitacore`` entry); None for a plain LLM folder, a hub id, or nothing."""
    if not path or not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return None
    with open(os.path.join(path, CONFIG_FILE)) as fh:
        config = json.load(fh)
    return config if "mm_vision_tower" in config or isinstance(config.get("vitacore"), dict) else None


def llm_config_for(path: str):
    """The LLM's transformers config for ``path``; VITA's model types map to their family."""
    from transformers import AutoConfig

    exported = read_export_config(path)
    if exported is not None and exported.get("model_type") in VITA_MODEL_TYPES:
        fields = {k: v for k, v in exported.items() if k != "model_type"}
        config = AutoConfig.for_model(VITA_MODEL_TYPES[exported["model_type"]], **fields)
    else:
        config = AutoConfig.from_pretrained(path)
    for key in (*MULTIMODAL_FIELDS, "vitacore"):  # the model's fields, kept on VitaModel.mm_config
        if key in config.__dict__:
            delattr(config, key)
    return config


class ShardReader:
    """Keys, shapes and values of a folder's safetensors (one file, or shards + index), read lazily."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as fh:
                self.file_of = dict(json.load(fh)["weight_map"])
        elif os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
            with safe_open(os.path.join(directory, WEIGHTS_FILE), "pt") as reader:
                self.file_of = {key: WEIGHTS_FILE for key in reader.keys()}
        else:
            raise FileNotFoundError(f"--model_name_or_path {directory!r}: neither {INDEX_FILE} nor {WEIGHTS_FILE} "
                                    "is there; a full export keeps its weights in safetensors")
        self._shapes: dict[str, tuple] = {}

    def shape(self, key: str) -> tuple:
        if key not in self._shapes:
            with safe_open(os.path.join(self.directory, self.file_of[key]), "pt") as reader:
                for name in reader.keys():
                    self._shapes[name] = tuple(reader.get_slice(name).get_shape())
        return self._shapes[key]

    def read(self, keys) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.file_of[key], []).append(key)
        values = {}
        for file_name, names in by_file.items():
            with safe_open(os.path.join(self.directory, file_name), "pt") as reader:
                values.update({name: reader.get_tensor(name) for name in names})
        return values


@contextlib.contextmanager
def _without_load_report():
    """Hide transformers' load report for this call: it lists every multimodal key as UNEXPECTED
    (they are the other parts' weights); the LLM's own problems are reported by the caller."""
    hf_logger = logging.getLogger("transformers.modeling_utils")
    drop = logging.Filter()
    drop.filter = lambda record: "LOAD REPORT" not in str(record.msg)
    hf_logger.addFilter(drop)
    try:
        yield
    finally:
        hf_logger.removeFilter(drop)


def _load_llm(path: str, dtype: torch.dtype, log, **llm_kwargs):
    from transformers import AutoModelForCausalLM

    with _without_load_report():
        llm, info = AutoModelForCausalLM.from_pretrained(path, config=llm_config_for(path), dtype=dtype,
                                                         attn_implementation=attention_implementation(dtype, log),
                                                         output_loading_info=True, **llm_kwargs)
    missing = sorted(info.get("missing_keys", ()))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if is_llm_key(k))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        log(f"vitacore: WARNING {path!r}: the LLM's weights do not fit it exactly (missing, newly initialized: "
            f"{missing}; unexpected: {unexpected}; mismatched: {mismatched})")
    llm.config.use_cache = False
    return llm


def _encoder_source(flag_value: Optional[str], directory: str, subfolder: str, marker, recorded,
                    field: str, flag: str) -> str:
    # `marker`: the config file name that identifies the encoder's folder, or a tuple of alternatives.
    markers = (marker,) if isinstance(marker, str) else tuple(marker)
    if flag_value:
        return flag_value
    folder = os.path.join(directory, subfolder)
    if any(os.path.isfile(os.path.join(folder, name)) for name in markers):
        return folder
    if isinstance(recorded, str) and any(os.path.isfile(os.path.join(recorded, name)) for name in markers):
        return recorded
    raise FileNotFoundError(
        f"{os.path.join(directory, CONFIG_FILE)}: {field} = {recorded!r} is not a folder with a "
        f"{' or '.join(markers)} on this machine, and the export has no {subfolder}/ folder; pass {flag} PATH "
        "(a folder holding the encoder's config; the weights still come from the export)")


def _build_tower(source: str, dtype: torch.dtype, recorded) -> VisionTower:
    """A tower of the architecture ``source`` describes, without loading its weights (the shards hold them).

    Under a live ZeRO-3 config it is built partitioned, as ``from_pretrained`` would. A remote-code
    tower (InternViT) runs the ``.py`` files the export copied into its ``vision_tower/`` folder.
    """
    return build_vision_tower(source, dtype, source=recorded or os.path.abspath(source))


def _build_audio_encoder(source: str, dtype: torch.dtype, recorded, log) -> nn.Module:
    """The tiny encoder or Whisper's, as ``source``'s config says, without weights (the shards hold them)."""
    return build_audio_encoder(source, dtype, recorded or os.path.abspath(source), log)


def _expected(module: nn.Module) -> dict[str, tuple]:
    """Full shapes of a module's parameters and persistent buffers (ZeRO-3 placeholders included)."""
    return {name: tuple(getattr(t, "ds_shape", t.shape)) for name, t in module.state_dict(keep_vars=True).items()}


def _load_parts(directory: str, reader: ShardReader, parts: dict[str, nn.Module], fresh: set[str]) -> None:
    """Fill each part from the shards; every non-LLM key must fit, every part tensor must be there.

    Partitioned (ZeRO-3) parts are filled on rank 0 inside ``GatheredParameters(modifier_rank=0)``;
    DeepSpeed then spreads rank 0's values. Plain parts are filled on every rank.
    """
    wanted = {part: _expected(module) for part, module in parts.items()}
    by_part: dict[str, dict[str, str]] = {part: {} for part in parts}
    unfit = []
    for key in reader.file_of:
        if is_llm_key(key):
            continue
        part, _, local = from_vita_name(key).partition(".")
        if part in fresh or part not in wanted or local not in wanted[part]:
            unfit.append(f"{key} ({reader.file_of[key]})")
        elif tuple(reader.shape(key)) != wanted[part][local]:
            raise ValueError(f"{directory!r}: {key} in {reader.file_of[key]} has shape {reader.shape(key)} but this "
                             f"model's {part} needs {wanted[part][local]}; the export was made for other encoders")
        else:
            by_part[part][local] = key
    if unfit:
        raise ValueError(f"{directory!r}: the weight files hold keys that fit no part of the model being built: "
                         f"{sorted(unfit)}")
    missing = [f"{part}: {sorted(set(wanted[part]) - set(by_part[part]))}" for part in parts
               if part not in fresh and set(wanted[part]) - set(by_part[part])]
    if missing:
        raise ValueError(f"{directory!r}: tensors missing from the weight files "
                         f"({INDEX_FILE if os.path.isfile(os.path.join(directory, INDEX_FILE)) else WEIGHTS_FILE}): "
                         f"{'; '.join(missing)}")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for part, module in parts.items():
        if part in fresh:
            continue
        if not any(is_partitioned(p) for p in module.parameters()):
            values = reader.read(by_part[part].values())
            module.load_state_dict({local: values[key] for local, key in by_part[part].items()}, strict=True)
            continue
        buffers = {name for name, _ in module.named_buffers()}
        with gathered(module.parameters(), modifier_rank=0):
            keys = by_part[part] if rank == 0 else {k: v for k, v in by_part[part].items() if k in buffers}
            values = reader.read(keys.values())
            module.load_state_dict({local: values[key] for local, key in keys.items()}, strict=rank == 0)


def load_export_model(config, directory: str, exported: dict, dtype: torch.dtype, log=print,
                      llm_kwargs: Optional[dict] = None) -> VitaModel:
    """Build the whole model a VITA-layout folder describes, its weights loaded from the folder.

    Call inside ``build_model``'s ZeRO-3 construction context when the run uses ZeRO-3: the LLM and
    the tower are then built partitioned, as on the plain path.

    Args:
        config: the run config (``--vision_tower`` / ``--audio_encoder`` override the saved encoder
            configs; ``--pretrain_mm_mlp_adapter`` / ``--pretrain_audio_mlp_adapter`` override the
            loaded adapters; ``--audio_prompt_num`` / the fo model type add parts the folder lacks).
        directory: the folder (``--model_name_or_path``).
        exported: its config.json (:func:`read_export_config`).
        dtype: the run's compute dtype.
        log: where notes go.
        llm_kwargs: extra ``from_pretrained`` arguments for the LLM (k-bit quantization).

    Raises:
        FileNotFoundError: an encoder config cannot be found (names the config field and the flag).
        ValueError: keys that fit no part, tensors missing, sizes that disagree, or ``use_s2`` set.
    """
    m, t = config.model, config.training
    if exported.get("use_s2"):
        raise ValueError(f"{os.path.join(directory, CONFIG_FILE)}: use_s2 is true (S2 multi-scale vision features), "
                         "which vitacore does not implement; this checkpoint's projector expects S2 features")
    reader = ShardReader(directory)
    keys = set(reader.file_of)
    llm = _load_llm(directory, dtype, log, **(llm_kwargs or {}))
    hidden = llm.config.hidden_size
    mm_config = {k: v for k, v in exported.items() if k in MULTIMODAL_FIELDS or k.startswith("mm_")}

    tower = projector = None
    if exported.get("mm_vision_tower") or m.vision_tower or any(k.startswith("model.vision_tower.") for k in keys):
        recorded = exported.get("mm_vision_tower")
        source = _encoder_source(m.vision_tower, directory, VISION_SUBFOLDER, CONFIG_FILE, recorded,
                                 "mm_vision_tower", "--vision_tower")
        tower = _build_tower(source, dtype, None if m.vision_tower else recorded)
        mm_hidden = exported.get("mm_hidden_size")
        if mm_hidden is not None and mm_hidden != tower.hidden_size:
            raise ValueError(f"--vision_tower {source!r}: hidden size {tower.hidden_size}, but the export's projector "
                             f"was trained on mm_hidden_size {mm_hidden}; pass the tower it was trained with")
        projector_type = exported.get("mm_projector_type") or m.mm_projector_type
        torch.manual_seed(t.seed)
        projector = build_projector(projector_type, tower.hidden_size, hidden).to(dtype)
        mm_config.update(mm_vision_tower=tower.source, mm_hidden_size=tower.hidden_size,
                         mm_projector_type=projector_type, use_mm_proj=True)

    encoder = adapter = None
    if exported.get("mm_audio_encoder") or m.audio_encoder or any(k.startswith("model.audio_encoder.") for k in keys):
        recorded = exported.get("mm_audio_encoder")
        source = _encoder_source(m.audio_encoder, directory, AUDIO_SUBFOLDER, (AUDIO_CONFIG_FILE, CONFIG_FILE),
                                 recorded, "mm_audio_encoder", "--audio_encoder")
        encoder = _build_audio_encoder(source, dtype, None if m.audio_encoder else recorded, log)
        kernel = reader.shape(ADAPTER_CONV_KEY)[-1] if ADAPTER_CONV_KEY in keys else 5
        adapter = AudioAdapter(encoder.hidden_size, hidden, kernel_size=kernel).to(dtype)
        mm_config["mm_audio_encoder"] = encoder.source

    # Parts this run adds to what the folder holds start fresh (e.g. stage fo's audio prompts).
    fresh = set()
    saved_prompts = reader.shape(PROMPT_KEY)[0] if PROMPT_KEY in keys else (exported.get("audio_prompt_num") or 0)
    if saved_prompts and m.audio_prompt_num and m.audio_prompt_num != saved_prompts:
        raise ValueError(f"--audio_prompt_num {m.audio_prompt_num}: the export at {directory!r} was trained with "
                         f"{saved_prompts} audio prompt embeddings; drop the flag or pass {saved_prompts}")
    prompt = None
    if saved_prompts or m.audio_prompt_finetune or m.audio_prompt_num:
        prompt = nn.Embedding(saved_prompts or m.audio_prompt_num, hidden).to(dtype)
        if not saved_prompts:
            fresh.add("audio_prompt")
        mm_config.update(audio_prompt_finetune=True, audio_prompt_num=prompt.num_embeddings)
    head_keys = sorted(k for k in keys if k.startswith(STATE_HEAD_PREFIX))
    head = None
    if head_keys:
        out_features, in_features = reader.shape(STATE_HEAD_PREFIX + "weight")
        head = nn.Linear(in_features, out_features, bias=STATE_HEAD_PREFIX + "bias" in keys).to(dtype)
    elif m.model_type == "qwen2p5_fo_instruct":
        head = nn.Linear(hidden, 3).to(dtype)
        fresh.add("state_head")

    padding_side = exported.get("tokenizer_padding_side") or "right"
    mm_config.update(tokenizer_padding_side=padding_side, tokenizer_model_max_length=t.model_max_length)
    model = VitaModel(llm, tower, projector, encoder, adapter, prompt, head, model_max_length=t.model_max_length,
                      padding_side=padding_side, mm_config=mm_config)
    parts = {name: module for name, module in model.unit_modules().items() if name != "llm"}
    _load_parts(directory, reader, parts, fresh)
    if fresh:
        log(f"vitacore: {directory!r} has no {', '.join(sorted(fresh))}; this run starts them from random init")

    if m.pretrain_mm_mlp_adapter and projector is not None:
        load_adapter_file(m.pretrain_mm_mlp_adapter, projector, "mm_projector.", "--pretrain_mm_mlp_adapter")
    if m.pretrain_audio_mlp_adapter and adapter is not None:
        load_adapter_file(m.pretrain_audio_mlp_adapter, adapter, "audio_encoder.adpter.",
                          "--pretrain_audio_mlp_adapter")
    return model
