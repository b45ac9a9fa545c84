"""Stage artifacts with VITA's file and key names (``mm_projector.bin``, ``audio_adpter.bin``)."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from vitacore.checkpoint.gather import gathered_state
from vitacore.durable import atomic_write
from vitacore.model import AdapterWeights
from vitacore.model.loading import read_tensor_file

MM_PROJECTOR_FILE = "mm_projector.bin"
AUDIO_ADAPTER_FILE = "audio_adpter.bin"  # VITA's spelling, kept so its loaders find the file
MM_PROJECTOR_PREFIX = "model.mm_projector."
AUDIO_ADAPTER_PREFIX = "model.audio_encoder.adpter."


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_stage_artifacts(model: nn.Module, output_dir: str, trainable_units: set[str], is_main: bool) -> dict[str, str]:
    """Write the adapter files for the units this stage trained.

    Called on every rank (gathering is collective under ZeRO-3); only the main rank writes.

    Returns:
        ``{file name: path}`` of what was written.
    """
    plan = []
    if "mm_projector" in trainable_units and getattr(model, "mm_projector", None) is not None:
        plan.append((MM_PROJECTOR_FILE, model.mm_projector, MM_PROJECTOR_PREFIX))
    if "audio_adapter" in trainable_units and getattr(model, "audio_adapter", None) is not None:
        plan.append((AUDIO_ADAPTER_FILE, model.audio_adapter, AUDIO_ADAPTER_PREFIX))
    written = {}
    for file_name, module, prefix in plan:
        # Parameters only, as VITA writes them (a BatchNorm adapter's running statistics are not in its files).
        state = gathered_state(module, prefix, parameters_only=True)
        path = os.path.join(output_dir, file_name)
        if is_main:
            os.makedirs(output_dir, exist_ok=True)
            atomic_torch_save(state, path)
        written[file_name] = path
    return written


def read_adapter_file(path: str, key_marker: str, flag: str) -> AdapterWeights:
    """Read a VITA-style adapter file with VITA's rule: keep keys containing ``key_marker`` and strip
    everything through it (``model.mm_projector.0.weight`` -> ``0.weight``).

    Args:
        path: the file (``mm_projector.bin``, ``audio_adpter.bin``, or VITA's own).
        key_marker: ``mm_projector.`` or ``audio_encoder.adpter.``.
        flag: the flag that named the file, for messages.

    The file is unpickled weights-only (:func:`vitacore.model.loading.read_tensor_file`): a pickle that
    would run code is refused.

    Raises:
        FileNotFoundError / ValueError: naming ``flag`` and the file (missing, a folder, unreadable,
            truncated, more than tensors, or no key with ``key_marker``).
    """
    weights = read_tensor_file(path, f"{flag} {path!r}")
    state = {k.split(key_marker, 1)[1]: v for k, v in weights.items() if key_marker in k}
    if not state:
        raise ValueError(f"{flag} {path!r}: no key contains {key_marker!r}; is this the right file?")
    return AdapterWeights(state, f"{flag} {path!r}", key_marker)
