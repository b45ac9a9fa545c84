"""How vitacore calls transformers' loaders: under ZeRO-3, quietly where its report misleads, and
tokenizers by VITA's rules."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from typing import Optional

import torch
from safetensors import SafetensorError

from vitacore.model.families import apply_pad_rule

# What loading a folder raises when its files are broken or incomplete (unreadable or truncated
# weights, a SyntaxError or ImportError in its code, a class or key its code lacks): the folder's
# problem, reported as such rather than as a traceback.
LOAD_ERRORS = (OSError, ImportError, SyntaxError, AttributeError, RuntimeError, KeyError, TypeError, NameError,
               SafetensorError)


@contextlib.contextmanager
def folder_load_errors(flag: str, path: str, what: str):
    """Turn a failure to load ``path`` into ``ValueError`` naming the flag and the folder.

    Args:
        flag: the flag that named the folder (``--model_name_or_path``).
        path: the folder.
        what: what was being loaded, for the message (``the LLM``).
    """
    try:
        yield
    except LOAD_ERRORS as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{flag} {path!r}: {what} does not load ({type(err).__name__}: {detail}). Check that the "
                         "folder is complete (config.json and every weight file, as saved by save_pretrained) "
                         "and readable") from err


def read_tensor_file(path: str, label: str) -> dict[str, torch.Tensor]:
    """A ``torch.save``d ``{name: tensor}`` file, unpickled weights-only: a file whose pickle would call
    anything but torch's tensor rebuilders is refused, never run.

    Args:
        path: the file (``mm_projector.bin``, ``audio_adpter.bin``, ``non_lora_trainables.bin``, ``final.pt``).
        label: how messages name it, e.g. ``--pretrain_mm_mlp_adapter '/runs/mm_projector.bin'``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming ``label``: a folder, unreadable, truncated or not torch's format, a pickle
            holding more than tensors, or not a dict of named tensors.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{label}: no such file")
    if not os.path.isfile(path):
        raise ValueError(f"{label}: not a file (a folder?); pass the file itself")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{label}: the file holds more than tensors (weights-only loading refused it: {detail}); "
                         "such a file can run code when unpickled, so it is not loaded; use a state dict saved "
                         "with torch.save") from None
    except Exception as err:  # whatever torch raises on a truncated, corrupt or unreadable file
        detail = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{label}: unreadable, truncated or not a torch.save file ({type(err).__name__}: {detail}); "
                         "copy the file again or pass another one") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{label}: expected a dict of named tensors (a state dict), found {type(state).__name__} "
                         "holding other values; is this the right file?")
    return state


def is_zero3(deepspeed_config: Optional[dict]) -> bool:
    """Whether a (complete) DeepSpeed config asks for ZeRO stage 3."""
    return bool(deepspeed_config) and deepspeed_config.get("zero_optimization", {}).get("stage") == 3


@contextlib.contextmanager
def zero3_construction(deepspeed_config: Optional[dict]):
    """While active, transformers builds models inside ``deepspeed.zero.Init`` (partitioned) when
    ``deepspeed_config`` is a ZeRO-3 config; otherwise nothing changes.

    ``HfDeepSpeedConfig`` is a weak global: it must be held in a variable for the whole build, or
    every rank silently loads the full model.
    """
    if not is_zero3(deepspeed_config):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig  # imports DeepSpeed: only for ZeRO-3 builds
    from transformers.integrations import deepspeed as hf_deepspeed

    previous = hf_deepspeed._hf_deepspeed_config_weak_ref  # e.g. a live TrainingArguments(deepspeed=...)
    keep_alive = HfDeepSpeedConfig(deepspeed_config)
    try:
        yield
    finally:
        del keep_alive
        hf_deepspeed._hf_deepspeed_config_weak_ref = previous


@contextlib.contextmanager
def quiet_load_report():
    """Hide transformers' load report for this call: it lists the keys a partial load leaves out
    (the other parts of a VITA-layout folder, Whisper's decoder) as problems; callers report real ones."""
    hf_logger = logging.getLogger("transformers.modeling_utils")
    drop = logging.Filter()
    drop.filter = lambda record: "LOAD REPORT" not in str(record.msg)
    hf_logger.addFilter(drop)
    try:
        yield
    finally:
        hf_logger.removeFilter(drop)


def load_tokenizer_for(path: str, model_max_length: int, model_type: Optional[str] = None):
    """The LLM's tokenizer, right-padded, with a pad token by VITA's rule (see
    :func:`vitacore.model.families.apply_pad_rule`: none -> unk, else eos; ``llama3-8b``: eos)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=model_max_length, padding_side="right",
                                              use_fast=True, local_files_only=os.path.isdir(path))
    return apply_pad_rule(tokenizer, model_type, path)
