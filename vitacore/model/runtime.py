"""Run-time switches set once the model is built: gradient checkpointing, TF32, encoder dummy passes, FLOPs."""

from __future__ import annotations

import torch
import torch.nn as nn


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool, tf32: bool | None, num_processes: int,
                         device: torch.device) -> list[str]:
    """Set what the run's hardware and flags decide about ``model``; return notes on flags ignored here.

    - ``gradient_checkpointing``: the LLM recomputes activations in backward (non-reentrant: it works
      with frozen weights and with inputs that carry the only gradient path).
    - ``tf32``: TF32 matmuls, on NVIDIA GPUs only (elsewhere the flag is noted as ignored).
    - Several processes: every encoder runs every step (on a dummy input if need be), so no rank
      waits in a collective for a module another rank skipped. One process has no one to wait for.
    - On GPUs, each forward records its training FLOPs (``tflops_per_s`` and ``mfu`` in the metrics).

    Args:
        model: a ``VitaModel`` (or any module; the multimodal switches apply where it has them).
        gradient_checkpointing: ``--gradient_checkpointing``.
        tf32: ``--tf32``.
        num_processes: processes in the job.
        device: this process's device.
    """
    notes = []
    if gradient_checkpointing:
        llm = getattr(model, "llm", model)
        kwargs = {"use_reentrant": False}
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if tf32:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            notes.append("--tf32 True ignored: TF32 exists only on NVIDIA GPUs")
    if hasattr(model, "run_all_encoders"):
        model.run_all_encoders = num_processes > 1
    if hasattr(model, "count_flops") and device.type == "cuda":
        model.count_flops = True
    return notes
