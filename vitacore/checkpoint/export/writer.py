"""Write the full export: one folder in VITA's layout (:mod:`vitacore.checkpoint.export.format`) that
``from_pretrained`` and vitacore both load."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors.torch import save_file

from vitacore.checkpoint.export.format import (
    AUDIO_SUBFOLDER,
    CONFIG_FILE,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    INDEX_FILE,
    MERGE_LORA_HINT,
    PROCESSOR_FILE,
    VISION_SUBFOLDER,
    WEIGHTS_FILE,
    is_full_export,
)
from vitacore.checkpoint.vita_layout import to_vita_name
from vitacore.durable import fsync_dir, fsync_tree
from vitacore.partition import gathered, is_partitioned

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """Bytes in ``size``: an int, or a string like ``"2GB"`` / ``"500MiB"`` (HF's convention: GB = 10^9)."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(str(size))
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size; use e.g. 2GB, 500MB or a byte count")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


@dataclass
class _Entry:
    """One tensor to write: its VITA key, the parameter or buffer, and its size in the file."""

    key: str
    tensor: torch.Tensor
    nbytes: int


def _full_shape(tensor: torch.Tensor) -> torch.Size:
    return tensor.ds_shape if is_partitioned(tensor) else tensor.shape


def _export_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    # Integer / bool buffers keep their type; only floating tensors take the export precision.
    return dtype if tensor.dtype.is_floating_point else tensor.dtype


def _entries(model: nn.Module, dtype: torch.dtype) -> list[_Entry]:
    """Every parameter and persistent buffer once, under its VITA key, in module order.

    A tensor shared under several names (tied embeddings) is written once, under the name HF keeps:
    the tie's source (``model.embed_tokens.weight``), never its target (``lm_head.weight``), so
    ``from_pretrained`` re-ties it exactly as after ``save_pretrained``.
    """
    tied_targets = {f"llm.{k}" for k in (getattr(model.llm, "all_tied_weights_keys", None) or {})}
    names_by_id: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(param), []).append(name)
        tensors[id(param)] = param
    for module_name, module in model.named_modules():
        for buffer_name, buffer in module._buffers.items():
            if buffer is None or buffer_name in module._non_persistent_buffers_set:
                continue
            names_by_id.setdefault(id(buffer), []).append(f"{module_name}.{buffer_name}".lstrip("."))
            tensors[id(buffer)] = buffer
    entries = []
    for tensor_id, names in names_by_id.items():
        kept = [n for n in names if n not in tied_targets] or names
        tensor = tensors[tensor_id]
        numel = int(torch.Size(_full_shape(tensor)).numel())
        itemsize = torch.empty((), dtype=_export_dtype(tensor, dtype)).element_size()
        entries.append(_Entry(to_vita_name(kept[0]), tensor, numel * itemsize))
    return entries


def _plan_shards(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    """Greedy, in order (HF's rule): a tensor larger than the limit gets a shard of its own."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _raise_everywhere(message: str | None, is_main: bool) -> None:
    """Raise the main rank's error on every rank, so no rank is left waiting in a gather."""
    _, world = _rank_and_world()
    if world > 1:
        box = [message if is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise ValueError(message)


def _check_exportable(model: nn.Module, directory: str) -> str | None:
    llm = model.llm
    peft = type(llm).__module__.startswith("peft") or getattr(llm, "peft_config", None) is not None
    if peft or any("lora_" in name for name, _ in llm.named_parameters()):
        return (f"save_full_export({directory!r}): the LLM is a peft (LoRA) model that is not merged; merge "
                f"LoRA first ({MERGE_LORA_HINT}, or merge_lora(model) from vitacore.checkpoint.lora), "
                "then export the merged model")
    if getattr(llm, "is_quantized", False) or getattr(llm.config, "quantization_config", None):
        return (f"save_full_export({directory!r}): the LLM is quantized (k-bit); a 16-bit export needs the "
                "unquantized weights: merge LoRA into the full-precision base model and export that")
    if os.path.exists(directory) and not os.path.isdir(directory):
        return f"save_full_export: {directory!r} exists and is not a folder; choose another export folder"
    config_file = os.path.join(directory, CONFIG_FILE)
    if os.path.exists(config_file) and not is_full_export(directory):
        return (f"save_full_export: {config_file!r} exists and is not from an earlier vitacore export; refusing to "
                "overwrite it: export into another folder")
    return None


def _projector_type(projector: nn.Module) -> str:
    if isinstance(projector, nn.Linear):
        return "linear"
    if isinstance(projector, nn.Identity):
        return "identity"
    is_mlp = isinstance(projector, nn.Sequential)
    linears = [m for m in projector.children() if isinstance(m, nn.Linear)] if is_mlp else []
    if not linears:
        raise ValueError(f"save_full_export: cannot name the projector type of {type(projector).__name__}; "
                         "set model.mm_config['mm_projector_type']")
    return f"mlp{len(linears)}x_gelu"


def multimodal_fields(model: nn.Module) -> dict:
    """VITA's multimodal config fields for ``model``: ``model.mm_config`` plus what the parts show."""
    fields = dict(model.mm_config)
    tower, projector = model.vision_tower, model.mm_projector
    fields["mm_vision_tower"] = fields.get("mm_vision_tower") or getattr(tower, "source", None)
    if tower is not None:
        fields["mm_hidden_size"] = tower.hidden_size
    fields["use_mm_proj"] = projector is not None
    if projector is not None and not fields.get("mm_projector_type"):
        fields["mm_projector_type"] = _projector_type(projector)
    fields["mm_audio_encoder"] = fields.get("mm_audio_encoder") or getattr(model.audio_encoder, "source", None)
    prompt = model.audio_prompt
    fields["audio_prompt_finetune"] = prompt is not None
    fields["audio_prompt_num"] = prompt.num_embeddings if prompt is not None else None
    fields["tokenizer_padding_side"] = model.padding_side
    fields["tokenizer_model_max_length"] = model.model_max_length
    return fields


def _export_config(model: nn.Module, dtype: torch.dtype) -> dict:
    """config.json: the LLM's config (its model_type, so AutoModelForCausalLM loads it) + VITA's fields."""
    config = model.llm.config.to_dict()
    config.pop("vitacore", None)
    config["architectures"] = [type(model.llm).__name__]
    config["use_cache"] = True  # VITA sets it back before saving; an export is for inference
    dtype_name = str(dtype).removeprefix("torch.")
    config["dtype"] = config["torch_dtype"] = dtype_name
    config.update(multimodal_fields(model))
    config["vitacore"] = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "dtype": dtype_name,
        "vision_tower_config": VISION_SUBFOLDER if model.vision_tower is not None else None,
        "audio_encoder_config": AUDIO_SUBFOLDER if model.audio_encoder is not None else None,
    }
    return config


def _write_encoder_configs(model: nn.Module, staging: str) -> None:
    tower = model.vision_tower
    if tower is not None:
        folder = os.path.join(staging, VISION_SUBFOLDER)
        tower.encoder.config.save_pretrained(folder)
        remote = not type(tower.encoder).__module__.startswith("transformers.")
        if remote and getattr(tower.encoder.config, "auto_map", None):
            # Remote code (InternViT): its config.json names .py files; copy them (and what they import
            # relatively) from the loaded module, so the export reloads with trust_remote_code on its own.
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(tower.encoder, folder)
        source = os.path.join(str(getattr(tower, "source", "")), PROCESSOR_FILE)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(folder, PROCESSOR_FILE))
        else:  # what the data pipeline reads, so the reloaded tower normalizes images the same way
            spec = tower.image_spec
            with open(os.path.join(folder, PROCESSOR_FILE), "w") as fh:
                json.dump({"image_mean": list(spec.mean), "image_std": list(spec.std),
                           "size": {"height": spec.image_size, "width": spec.image_size}}, fh, indent=2)
    if model.audio_encoder is not None:  # each encoder kind writes what rebuilds it (Whisper: + its feature extractor)
        model.audio_encoder.save_config(os.path.join(staging, AUDIO_SUBFOLDER))


def _gather_shard(shard: list[_Entry], dtype: torch.dtype, keep: bool) -> dict[str, torch.Tensor]:
    """Gather one shard's partitioned tensors (collective) and, when ``keep``, copy them to CPU."""
    with gathered(e.tensor for e in shard):
        if not keep:
            return {}
        return {e.key: e.tensor.detach().to("cpu", _export_dtype(e.tensor, dtype), copy=True).contiguous()
                for e in shard}


def _readable_like_other_files(path: str) -> None:
    """safetensors creates files owner-only (0600); give them the umask's usual mode, as for the JSONs."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _earlier_export_files(directory: str) -> set[str]:
    if not is_full_export(directory):
        return set()
    with open(os.path.join(directory, CONFIG_FILE)) as fh:
        return set(json.load(fh)["vitacore"].get("files", [CONFIG_FILE]))


def publish_into(staging: str, directory: str, replaceable: frozenset = frozenset()) -> None:
    """Move a finished, fsynced ``staging`` folder into place (main rank).

    A new ``directory`` is one rename. Into an existing folder (e.g. a run's output_dir, next to its
    checkpoints) each entry is replaced by a rename, so every file and subfolder there is at any
    moment either the old one or the new one, whole: a subfolder is renamed aside, the new one put in
    its place, the old one deleted. ``config.json`` (an export's index) goes last; what only the
    earlier export had is then removed; everything else there is left alone.

    Args:
        staging: the finished folder (a sibling or child of ``directory`` on the same file system).
        directory: where its entries belong.
        replaceable: names that may replace entries of ``directory`` that no earlier export wrote
            (a run's own final artifacts).

    Raises:
        ValueError: ``directory`` holds entries of the same names that are neither from an earlier
            export nor ``replaceable``.
    """
    if not os.path.exists(directory):
        os.rename(staging, directory)
        fsync_dir(os.path.dirname(os.path.abspath(directory)))
        return
    earlier = _earlier_export_files(directory)
    entries = sorted(os.listdir(staging), key=lambda name: name == CONFIG_FILE)
    clashes = [name for name in entries if os.path.exists(os.path.join(directory, name))
               and name not in earlier and name not in replaceable]
    if clashes:
        raise ValueError(f"save_full_export: {directory!r} already holds {clashes}, which are not from an earlier "
                         "vitacore export; refusing to overwrite them: export into another folder")
    for name in entries:
        target = os.path.join(directory, name)
        aside = None
        if os.path.isdir(target) and not os.path.islink(target):
            aside = f"{target}.old-{os.getpid()}"
            os.replace(target, aside)
        os.replace(os.path.join(staging, name), target)
        if aside:
            shutil.rmtree(aside, ignore_errors=True)
    for name in sorted(earlier - set(entries)):
        target = os.path.join(directory, name)
        if os.path.isdir(target):
            shutil.rmtree(target, ignore_errors=True)
        elif os.path.exists(target):
            os.remove(target)
    os.rmdir(staging)
    fsync_dir(directory)


def save_full_export(model: nn.Module, tokenizer, directory: str, is_main: bool, dtype: torch.dtype = torch.bfloat16,
                     max_shard_size="2GB") -> dict[str, str]:
    """Write ``model`` as one folder in VITA's layout (see the module docstring).

    Call it on every rank: ZeRO-3 partitioned parameters are gathered one shard at a time (a
    collective), so no rank ever holds more than about one shard of gathered weights; only the main
    rank writes. The export is built in a folder beside ``directory`` and moved into place only when
    complete, so an interrupted export leaves an earlier one intact. ``directory`` may hold other
    things (a run's output_dir: checkpoints, adapter files); they are left alone.

    Args:
        model: the ``VitaModel`` (a DeepSpeed engine's ``.module`` is taken when given the engine).
        tokenizer: saved with ``save_pretrained``.
        directory: the export folder: new, or holding nothing the export would overwrite but an
            earlier export (whose files, listed in its config.json, are all replaced).
        is_main: whether this rank writes.
        dtype: precision of the floating tensors in the file (bf16 by default; float32 allowed).
        max_shard_size: largest weight file, e.g. ``"2GB"`` or a byte count.

    Returns:
        ``{name: final path}``: config.json, each weight file, the index (several shards),
        generation_config.json, the encoder config folders, and ``tokenizer`` (the folder).

    Raises:
        ValueError: an unmerged LoRA or a quantized LLM, or ``directory`` holds files of the same
            names that no earlier export wrote.
    """
    wrapped = getattr(model, "module", None)  # a DeepSpeed engine: export the model it wraps
    if isinstance(wrapped, nn.Module) and hasattr(wrapped, "llm"):
        model = wrapped
    model = getattr(model, "whole_model", model)  # a ZeRO-3 view without the frozen parts: the whole model
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"save_full_export: dtype {dtype} is not supported; use torch.bfloat16, float16 or float32")
    directory = os.path.abspath(directory)
    _raise_everywhere(_check_exportable(model, directory) if is_main else None, is_main)

    shards = _plan_shards(_entries(model, dtype), parse_size(max_shard_size))
    names = _shard_names(len(shards))
    staging = f"{directory}.tmp-{os.getpid()}"
    written = {name: os.path.join(directory, name) for name in [CONFIG_FILE, *names]}
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    try:
        weight_map = {}
        for name, shard in zip(names, shards):
            tensors = _gather_shard(shard, dtype, keep=is_main)
            if is_main:
                save_file(tensors, os.path.join(staging, name), metadata={"format": "pt"})
                _readable_like_other_files(os.path.join(staging, name))
                weight_map.update(dict.fromkeys(tensors, name))
        if is_main:
            if len(shards) > 1:
                index = {"metadata": {"total_size": sum(e.nbytes for s in shards for e in s)},
                         "weight_map": dict(sorted(weight_map.items()))}
                with open(os.path.join(staging, INDEX_FILE), "w") as fh:
                    json.dump(index, fh, indent=2)
            generation_config = getattr(model.llm, "generation_config", None)
            if generation_config is not None and model.llm.can_generate():
                generation_config.save_pretrained(staging)
            _write_encoder_configs(model, staging)
            tokenizer.save_pretrained(staging)
            config = _export_config(model, dtype)
            # Written last, listing what belongs to the export: a later export replaces exactly these.
            config["vitacore"]["files"] = sorted({*os.listdir(staging), CONFIG_FILE})
            with open(os.path.join(staging, CONFIG_FILE), "w") as fh:
                json.dump(config, fh, indent=2, sort_keys=True)
            fsync_tree(staging)
            publish_into(staging, directory)
    except BaseException:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if _rank_and_world()[1] > 1:
            torch.distributed.barrier()  # the files exist for every rank once this returns
    if len(shards) > 1:
        written[INDEX_FILE] = os.path.join(directory, INDEX_FILE)
    if getattr(model.llm, "generation_config", None) is not None and model.llm.can_generate():
        written["generation_config.json"] = os.path.join(directory, "generation_config.json")
    for subfolder, part in ((VISION_SUBFOLDER, model.vision_tower), (AUDIO_SUBFOLDER, model.audio_encoder)):
        if part is not None:
            written[subfolder] = os.path.join(directory, subfolder)
    written["tokenizer"] = directory
    return written
