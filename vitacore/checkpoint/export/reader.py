"""Load a whole ``VitaModel`` from a folder in VITA's layout: a vitacore full export or a VITA checkpoint.

Such a folder's ``config.json`` is the LLM's config plus VITA's multimodal fields (``mm_vision_tower``,
``mm_projector_type``, ...), and its safetensors hold every part under VITA's key names. The LLM comes
from ``AutoModelForCausalLM.from_pretrained(folder)`` (it loads the keys that are its own); the other
parts are constructed from encoder configs, then filled from the same shards through
:func:`vitacore.checkpoint.vita_layout.from_vita_name`.

Where an encoder's config comes from, first match wins: ``--vision_tower`` / ``--audio_encoder``;
the export's ``vision_tower/`` / ``audio_encoder/`` folder; the ``mm_vision_tower`` /
``mm_audio_encoder`` path recorded in config.json, when it exists on this machine.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn as nn
from safetensors import safe_open

from vitacore.checkpoint.export.format import (
    ADAPTER_CONV_KEY,
    AUDIO_SUBFOLDER,
    CONFIG_FILE,
    INDEX_FILE,
    MULTIMODAL_FIELDS,
    PROMPT_KEY,
    STATE_HEAD_PREFIX,
    VISION_SUBFOLDER,
    WEIGHTS_FILE,
    llm_config_for,
    read_export_config,
)
from vitacore.checkpoint.vita_layout import from_vita_name, is_llm_key
from vitacore.console import logger
from vitacore.model import (
    AUDIO_CONFIG_FILE,
    ModelBundle,
    ModelSpec,
    StartWeights,
    VitaModel,
    build_projector,
    build_vision_tower,
    finish_model,
    folder_load_errors,
    infer_model_type,
    llm_load_kwargs,
    load_audio_stack,
    load_tokenizer_for,
    quiet_load_report,
    zero3_construction,
)
from vitacore.model.vision import check_tower_trust
from vitacore.model.whale import CONFIG_FILE as WHALE_CONFIG_FILE
from vitacore.partition import gathered, is_partitioned


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
                self.file_of = dict.fromkeys(reader.keys(), WEIGHTS_FILE)
        else:
            raise FileNotFoundError(f"--model_name_or_path {directory!r}: neither {INDEX_FILE} nor {WEIGHTS_FILE} "
                                    "is there; a full export keeps its weights in safetensors")
        self._shapes: dict[str, tuple] = {}

    def shape(self, key: str) -> tuple:
        if key not in self._shapes:
            with safe_open(os.path.join(self.directory, self.file_of[key]), "pt") as reader:
                for name in reader.keys():  # noqa: SIM118 - a safetensors reader, not a dict
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


def _load_llm(spec: ModelSpec, exported: dict):
    from transformers import AutoModelForCausalLM

    path = spec.llm_path
    with quiet_load_report(), folder_load_errors("--model_name_or_path", path, "the LLM part"):
        llm, info = AutoModelForCausalLM.from_pretrained(path, config=llm_config_for(path, exported), dtype=spec.dtype,
                                                         output_loading_info=True, **llm_load_kwargs(spec))
    missing = sorted(info.get("missing_keys", ()))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if is_llm_key(k))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        logger.info(f"vitacore: WARNING {path!r}: the LLM's weights do not fit it exactly (missing, newly "
                    f"initialized: {missing}; unexpected: {unexpected}; mismatched: {mismatched})")
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


def _tower_source(spec: ModelSpec, exported: dict) -> tuple[str, str, str]:
    """``(folder, recorded source, how messages name the folder)`` of the tower a VITA-layout model is built from."""
    directory, recorded = spec.llm_path, exported.get("mm_vision_tower")
    folder = _encoder_source(spec.vision_tower_path, directory, VISION_SUBFOLDER, CONFIG_FILE, recorded,
                             "mm_vision_tower", "--vision_tower")
    if spec.vision_tower_path:
        return folder, os.path.abspath(folder), f"--vision_tower {folder!r}"
    where = f"the {VISION_SUBFOLDER}/ folder" if folder != recorded else f"mm_vision_tower in {CONFIG_FILE}"
    return folder, recorded or os.path.abspath(folder), f"--model_name_or_path {directory!r} ({where} {folder!r})"


def check_export_trust(spec: ModelSpec, exported: dict) -> None:
    """Refuse, before anything loads, a VITA-layout model whose tower folder holds code (InternViT) without
    ``spec.trust_remote_code``; a folder that cannot be found is left to the load to report."""
    try:
        folder, _, label = _tower_source(spec, exported)
    except FileNotFoundError:
        return
    check_tower_trust(folder, spec.trust_remote_code, label)


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


def load_export_model(spec: ModelSpec, exported: dict) -> VitaModel:
    """Build the whole model a VITA-layout folder (``spec.llm_path``) describes, weights from the folder.

    Call inside :func:`vitacore.model.zero3_construction` when the run uses ZeRO-3: the LLM and the
    tower are then built partitioned, as on the plain path.

    Args:
        spec: the model's config (``vision_tower_path`` / ``audio_encoder_path`` override the saved
            encoder configs; ``audio_prompt_num`` / the fo model type add parts the folder lacks).
        exported: the folder's config.json (:func:`read_export_config`).

    Raises:
        FileNotFoundError: an encoder config cannot be found (names the config field and the flag).
        ValueError: keys that fit no part, tensors missing, sizes that disagree, or ``use_s2`` set.
    """
    directory, dtype = spec.llm_path, spec.dtype
    if exported.get("use_s2"):
        raise ValueError(f"{os.path.join(directory, CONFIG_FILE)}: use_s2 is true (S2 multi-scale vision features), "
                         "which vitacore does not implement; this checkpoint's projector expects S2 features")
    reader = ShardReader(directory)
    keys = set(reader.file_of)
    llm = _load_llm(spec, exported)
    hidden = llm.config.hidden_size
    mm_config = {k: v for k, v in exported.items() if k in MULTIMODAL_FIELDS or k.startswith("mm_")}

    tower = projector = None
    has_tower = any(k.startswith("model.vision_tower.") for k in keys)
    if exported.get("mm_vision_tower") or spec.vision_tower_path or has_tower:
        source, recorded, label = _tower_source(spec, exported)
        # Remote code (InternViT) runs the .py files the export copied into its vision_tower/ folder,
        # only with --trust_remote_code.
        tower = build_vision_tower(source, dtype, source=recorded, trust_remote_code=spec.trust_remote_code,
                                   label=label)
        mm_hidden = exported.get("mm_hidden_size")
        if mm_hidden is not None and mm_hidden != tower.hidden_size:
            raise ValueError(f"{label}: hidden size {tower.hidden_size}, but the export's projector "
                             f"was trained on mm_hidden_size {mm_hidden}; pass the tower it was trained with")
        projector_type = exported.get("mm_projector_type") or spec.mm_projector_type
        torch.manual_seed(spec.seed)
        projector = build_projector(projector_type, tower.hidden_size, hidden).to(dtype)
        mm_config.update(mm_vision_tower=tower.source, mm_hidden_size=tower.hidden_size,
                         mm_projector_type=projector_type, use_mm_proj=True)

    encoder = adapter = None
    has_audio = any(k.startswith("model.audio_encoder.") for k in keys)
    if exported.get("mm_audio_encoder") or spec.audio_encoder_path or has_audio:
        recorded = exported.get("mm_audio_encoder")
        source = _encoder_source(spec.audio_encoder_path, directory, AUDIO_SUBFOLDER,
                                 (AUDIO_CONFIG_FILE, CONFIG_FILE, WHALE_CONFIG_FILE), recorded, "mm_audio_encoder",
                                 "--audio_encoder")
        kernel = reader.shape(ADAPTER_CONV_KEY)[-1] if ADAPTER_CONV_KEY in keys else 5
        stack = load_audio_stack(source, dtype, hidden, with_weights=False, adapter_kernel_size=kernel,
                                 source=(None if spec.audio_encoder_path else recorded) or os.path.abspath(source))
        encoder, adapter = stack.encoder, stack.adapter
        mm_config["mm_audio_encoder"] = encoder.source

    # Parts this run adds to what the folder holds start fresh (e.g. stage fo's audio prompts).
    fresh = set()
    saved_prompts = reader.shape(PROMPT_KEY)[0] if PROMPT_KEY in keys else (exported.get("audio_prompt_num") or 0)
    if saved_prompts and spec.audio_prompt_num and spec.audio_prompt_num != saved_prompts:
        raise ValueError(f"--audio_prompt_num {spec.audio_prompt_num}: the export at {directory!r} was trained with "
                         f"{saved_prompts} audio prompt embeddings; drop the flag or pass {saved_prompts}")
    prompt = None
    if saved_prompts or spec.audio_prompt_finetune or spec.audio_prompt_num:
        prompt = nn.Embedding(saved_prompts or spec.audio_prompt_num, hidden).to(dtype)
        if not saved_prompts:
            fresh.add("audio_prompt")
        mm_config.update(audio_prompt_finetune=True, audio_prompt_num=prompt.num_embeddings)
    head_keys = sorted(k for k in keys if k.startswith(STATE_HEAD_PREFIX))
    head = None
    if head_keys:
        out_features, in_features = reader.shape(STATE_HEAD_PREFIX + "weight")
        head = nn.Linear(in_features, out_features, bias=STATE_HEAD_PREFIX + "bias" in keys).to(dtype)
    elif spec.model_type == "qwen2p5_fo_instruct":
        head = nn.Linear(hidden, 3).to(dtype)
        fresh.add("state_head")

    padding_side = exported.get("tokenizer_padding_side") or "right"
    mm_config.update(tokenizer_padding_side=padding_side, tokenizer_model_max_length=spec.model_max_length)
    model = VitaModel(llm, tower, projector, encoder, adapter, prompt, head, model_max_length=spec.model_max_length,
                      padding_side=padding_side, mm_config=mm_config)
    parts = {name: module for name, module in model.unit_modules().items() if name != "llm"}
    _load_parts(directory, reader, parts, fresh)
    if fresh:
        logger.info(f"vitacore: {directory!r} has no {', '.join(sorted(fresh))}; this run starts them from random init")
    return model


def load_export_bundle(spec: ModelSpec, exported: dict, start: Optional[StartWeights] = None,
                       deepspeed_config: Optional[dict] = None) -> ModelBundle:
    """The model and tokenizer of a VITA-layout folder (``spec.llm_path``), ready to train.

    Args:
        spec: the model's config (its ``model_type`` already resolved for this folder).
        exported: the folder's config.json (:func:`read_export_config`).
        start: adapters loaded over the folder's (``--pretrain_mm_mlp_adapter`` ...), and LoRA weights.
        deepspeed_config: a complete ZeRO-3 config builds the LLM and tower partitioned.
    """
    tokenizer = load_tokenizer_for(spec.llm_path, spec.model_max_length, spec.model_type)
    with zero3_construction(deepspeed_config):
        model = load_export_model(spec, exported)
    return ModelBundle(finish_model(model, spec, start or StartWeights()), tokenizer)


def load_full_export(directory: str, dtype: torch.dtype = torch.float32, vision_tower: str | None = None,
                     audio_encoder: str | None = None, deepspeed_config: dict | None = None,
                     trust_remote_code: bool = False) -> ModelBundle:
    """Load a full export outside a training run (tests, tools); a run does the same with
    ``--model_name_or_path DIR``.

    Args:
        directory: the export (or a VITA checkpoint folder).
        dtype: torch.float32 or torch.bfloat16.
        vision_tower / audio_encoder: encoder config folders overriding the export's.
        deepspeed_config: a complete ZeRO-3 config builds the LLM and tower partitioned.
        trust_remote_code: allow running the tower folder's Python files (an InternViT export's
            ``vision_tower/``); without it such an export is refused.

    Returns:
        A :class:`vitacore.model.ModelBundle` (model, tokenizer).
    """
    exported = read_export_config(directory)
    if exported is None:
        raise FileNotFoundError(f"load_full_export: {os.path.join(directory, CONFIG_FILE)!r} is missing or has no "
                                "mm_vision_tower / vitacore entry; is this a full export?")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"load_full_export: dtype {dtype} is not supported; use torch.float32 or torch.bfloat16")
    choice = infer_model_type(exported.get("model_type"), directory, None, None, False, False)
    spec = ModelSpec(llm_path=directory, vision_tower_path=vision_tower, audio_encoder_path=audio_encoder,
                     model_type=choice.model_type, dtype=dtype,
                     model_max_length=exported.get("tokenizer_model_max_length") or ModelSpec.model_max_length,
                     trust_remote_code=trust_remote_code)
    check_export_trust(spec, exported)
    return load_export_bundle(spec, exported, deepspeed_config=deepspeed_config)
