"""LoRA artifacts: the PEFT adapter folder, ``non_lora_trainables.bin``, and merging.

A LoRA run's output holds what VITA's LoRA runs write::

    adapter_config.json          peft's LoraConfig (inference_mode, bias = --lora_bias)
    adapter_model.safetensors    base_model.model.<llm keys>.lora_A.weight ... (peft's format)
    non_lora_trainables.bin      every other trained tensor, e.g. base_model.model.model.mm_projector.0.weight

``PeftModel.from_pretrained(base_llm, folder)`` loads the adapter; VITA's builder loads
``non_lora_trainables.bin`` by stripping ``base_model.`` and then ``model.`` from keys starting
``model.model.``, which gives its own names (``model.mm_projector.0.weight``).
Gathering is collective under ZeRO-3: every rank calls these functions; only the main rank writes.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Iterable

import torch
import torch.nn as nn
from safetensors.torch import save_file

from vitacore.checkpoint.artifacts import atomic_torch_save
from vitacore.checkpoint.vita_layout import to_vita_name
from vitacore.constants import QUANTIZED_PARAM_TYPES
from vitacore.durable import atomic_write
from vitacore.freeze import LORA_BIAS, LORA_MARKER
from vitacore.model import LoraWeights, is_quantized
from vitacore.model.loading import read_tensor_file
from vitacore.partition import gathered, is_partitioned

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
NON_LORA_FILE = "non_lora_trainables.bin"
_PEFT_PREFIX = "base_model.model."  # how peft names the wrapped model, and VITA names the whole model
_ADAPTER = "default"


def _peft_llm(model: nn.Module) -> nn.Module:
    llm = getattr(model, "llm", model)
    if not hasattr(llm, "peft_config"):
        raise ValueError("the model's LLM carries no LoRA adapters (build it with --lora_enable True)")
    return llm


def _is_lora_tensor(name: str) -> bool:
    return LORA_MARKER in name


def _gathered(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """CPU copies of ``named`` parameters, gathering only those ZeRO-3 partitioned (a collective then)."""
    named = list(named)
    with gathered(p for _, p in named):
        return {name: p.detach().cpu().clone() for name, p in named}


def _adapter_names(llm: nn.Module, lora_bias: str) -> list[str]:
    """The peft model's parameter names that the adapter file carries under ``lora_bias``."""
    if lora_bias not in LORA_BIAS:
        raise ValueError(f"--lora_bias {lora_bias!r} is not one of: {', '.join(LORA_BIAS)}")
    names = [n for n, _ in llm.named_parameters()]
    adapted = {n.split(".lora_A.", 1)[0] for n in names if ".lora_A." in n}
    chosen = []
    for name in names:
        any_bias = name.endswith(".bias") and lora_bias == "all"
        # peft keeps an adapted layer's bias at X.base_layer.bias
        adapted_bias = lora_bias == "lora_only" and name.endswith(".base_layer.bias") and \
            name[: -len(".base_layer.bias")] in adapted
        if _is_lora_tensor(name) or any_bias or adapted_bias:
            chosen.append(name)
    return chosen


def _peft_file_key(name: str) -> str:
    """peft's saved key for a parameter of the peft model: the adapter name dropped."""
    return name.replace(f".{_ADAPTER}.", ".") if _is_lora_tensor(name) else name


def lora_state_dict(model: nn.Module, lora_bias: str = "none") -> dict[str, torch.Tensor]:
    """The adapter tensors in peft's file format (what ``PeftModel.save_pretrained`` writes).

    Keys look like ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Biases follow
    ``lora_bias``: ``none`` none; ``all`` every bias of the LLM; ``lora_only`` the biases of the
    adapted layers (``...q_proj.base_layer.bias``). Collective under ZeRO-3.

    Args:
        model: a ``VitaModel`` whose LLM is a peft model (or the peft model itself).
        lora_bias: ``none``, ``all`` or ``lora_only``.
    """
    llm = _peft_llm(model)
    params = dict(llm.named_parameters())
    wanted = _adapter_names(llm, lora_bias)
    state = _gathered((n, params[n]) for n in wanted)
    return {_peft_file_key(n): t for n, t in state.items()}


def _non_lora_key(name: str) -> str:
    """VITA's key in ``non_lora_trainables.bin`` for a ``VitaModel`` parameter name."""
    # VITA names these from the peft model wrapping the whole VITA model; an adapted layer's own
    # tensors sit at ``X.base_layer.*`` in peft but at ``X.*`` in the base model VITA loads into.
    return _PEFT_PREFIX + to_vita_name(name).replace(".base_layer.", ".")


def non_lora_trainables(model: nn.Module, lora_bias: str = "none") -> dict[str, torch.Tensor]:
    """Every trainable parameter that the adapter file does not carry, keyed as VITA's loader expects.

    Keys: ``"base_model.model." + to_vita_name(name)``, e.g. ``base_model.model.model.mm_projector.0.weight``.
    LLM biases that ``lora_bias`` puts in the adapter are left out, so no tensor is stored twice.
    Collective under ZeRO-3.
    """
    in_adapter = set()
    llm = getattr(model, "llm", None)
    if llm is not None and hasattr(llm, "peft_config"):
        in_adapter = {f"llm.{n}" for n in _adapter_names(llm, lora_bias)}
    chosen = [(n, p) for n, p in model.named_parameters()
              if p.requires_grad and not _is_lora_tensor(n) and n not in in_adapter]
    return {_non_lora_key(n): t for n, t in _gathered(chosen).items()}


def _adapter_config_dict(llm: nn.Module, lora_bias: str) -> dict:
    config = copy.deepcopy(llm.peft_config[_ADAPTER])
    config.inference_mode = True  # as peft's save_pretrained writes it
    config.bias = lora_bias  # the file's biases and the config always agree
    return config.to_dict()


def save_lora_artifacts(model: nn.Module, directory: str, lora_bias: str, is_main: bool) -> dict[str, str]:
    """Write ``adapter_config.json``, ``adapter_model.safetensors`` and ``non_lora_trainables.bin``.

    Every rank calls this (ZeRO-3 gathering is collective); only ``is_main`` writes. Each file is
    written to a temporary name and renamed, so a kill never leaves half a file.

    Returns:
        ``{file name: path}``.
    """
    llm = _peft_llm(model)
    adapter = lora_state_dict(model, lora_bias)
    others = non_lora_trainables(model, lora_bias)
    paths = {name: os.path.join(directory, name) for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, NON_LORA_FILE)}
    if is_main:
        os.makedirs(directory, exist_ok=True)
        config = _adapter_config_dict(llm, lora_bias)

        def write_config(path):
            with open(path, "w") as fh:
                json.dump(config, fh, indent=2, sort_keys=True, default=list)

        atomic_write(paths[ADAPTER_CONFIG_FILE], write_config)
        tensors = {k: v.contiguous() for k, v in adapter.items()}
        atomic_write(paths[ADAPTER_WEIGHTS_FILE], lambda path: save_file(tensors, path, metadata={"format": "pt"}))
        atomic_torch_save(others, paths[NON_LORA_FILE])
    return paths


def _vita_loader_key(key: str) -> str:
    """A ``non_lora_trainables.bin`` key as a VITA key (VITA's builder rule, LLM keys kept whole)."""
    if key.startswith(_PEFT_PREFIX):
        return key[len(_PEFT_PREFIX):]
    if key.startswith("base_model."):
        key = key[len("base_model."):]
        return key[len("model."):] if key.startswith("model.model.") else key
    return key


def load_non_lora_trainables(path: str, model: nn.Module, origin: str = "") -> list[str]:
    """Load a ``non_lora_trainables.bin`` (vitacore's or VITA's) into ``model``.

    Keys map with VITA's rule (``base_model.`` stripped, then ``model.`` for ``model.model.*``) to
    VITA names, and those to this model's parameters. Every key must fit a parameter with the same
    shape. Collective under ZeRO-3 (every rank calls it; rank 0's values are kept). The file is
    unpickled weights-only: a pickle that would run code is refused.

    Args:
        path: the file.
        model: the model to fill.
        origin: how messages name the folder it came from (``merge-lora '/runs/lora'``); default the path.

    Returns:
        The ``VitaModel`` parameter names that were loaded.

    Raises:
        FileNotFoundError / ValueError: naming the file and the keys that do not fit.
    """
    label = f"{origin}: {NON_LORA_FILE} {path!r}" if origin else repr(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{label}: no such file (a LoRA run writes {NON_LORA_FILE} beside its adapter)")
    state = read_tensor_file(path, label)
    params = dict(model.named_parameters())
    by_key = {_vita_loader_key(_non_lora_key(n)): n for n in params}
    targets, unknown, mismatched = {}, [], []
    for key, value in state.items():
        name = by_key.get(_vita_loader_key(key))
        if name is None:
            unknown.append(key)
            continue
        shape = tuple(getattr(params[name], "ds_shape", params[name].shape))
        if type(params[name]).__name__ in QUANTIZED_PARAM_TYPES:
            mismatched.append(f"{key}: the model holds this weight in 4/8 bits (--bits)")
        elif tuple(value.shape) != shape:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {shape}")
        targets[name] = value
    if unknown or mismatched:
        raise ValueError(f"{label} does not fit this model: {len(unknown)} keys fit no parameter "
                         f"{unknown[:5]}, {len(mismatched)} shapes differ {mismatched[:5]}")
    with gathered((params[n] for n in targets), modifier_rank=0), torch.no_grad():
        for name, value in targets.items():
            params[name].data.copy_(value.to(params[name].dtype))
    return sorted(targets)


def merge_lora(model: nn.Module) -> None:
    """Fold the LoRA adapters into the LLM's weights: ``model.llm`` becomes a plain causal LM.

    Raises:
        ValueError: no adapters; a 4/8-bit base (merging would re-quantize the weights: reload
            the base with ``--bits 16``, load the adapter, then merge); partitioned (ZeRO-3) weights.
    """
    llm = _peft_llm(model)
    if is_quantized(llm):
        raise ValueError("the LLM is loaded in 4/8 bits (--bits); merging LoRA into quantized weights would "
                         "re-quantize them and lose precision. Reload the base LLM with --bits 16, load the "
                         "adapter (PeftModel.from_pretrained or --lora_weight_path), then merge")
    if any(is_partitioned(p) for p in llm.parameters()):
        raise ValueError("the LLM's weights are ZeRO-3 partitioned; merge after loading the saved adapter into a "
                         "base model outside DeepSpeed")
    model.llm = llm.merge_and_unload()


def read_lora_weights(directory: str, flag: str = "--lora_weight_path") -> LoraWeights:
    """Read a saved PEFT adapter folder (``adapter_model.safetensors`` or ``.bin``, and its config).

    Raises:
        FileNotFoundError: no such folder, or no adapter weights in it, naming ``flag``.
    """
    from peft.utils import load_peft_weights  # peft takes seconds to import: LoRA runs only

    files = (ADAPTER_WEIGHTS_FILE, "adapter_model.bin")
    if not os.path.isdir(directory) or not any(os.path.exists(os.path.join(directory, f)) for f in files):
        raise FileNotFoundError(f"{flag} {directory!r}: expected a folder holding {files[0]} (or {files[1]}) "
                                "as written by a LoRA run or PeftModel.save_pretrained")
    config_path = os.path.join(directory, ADAPTER_CONFIG_FILE)
    saved_config = None
    if os.path.exists(config_path):
        with open(config_path) as fh:
            saved_config = json.load(fh)
    return LoraWeights(load_peft_weights(directory, device="cpu"), saved_config, f"{flag} {directory!r}")
