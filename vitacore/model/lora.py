"""LoRA adapters on the LLM, and loading the LLM in 4 / 8 bits (QLoRA) with bitsandbytes.

A run with ``--lora_enable True`` wraps ``model.llm`` (and only the LLM: towers, projector and audio
parts are never adapted or quantized) in a peft ``PeftModel``::

    bundle = build_model(spec)     # calls apply_lora(bundle.model, spec.lora, ...) at the end
    bundle.model.llm               # PeftModel; parameters "llm.base_model.model.<llm keys>"

``--bits 4`` / ``--bits 8`` load the LLM's Linear layers as bitsandbytes layers
(:func:`kbit_load_kwargs`); such weights cannot train, so LoRA is required with them.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from vitacore.constants import QUANTIZED_PARAM_TYPES
from vitacore.model.spec import LoraSpec, LoraWeights, QuantSpec
from vitacore.partition import gathered

TARGETS_FLAG = "--lora_target_modules"
_EXCLUDED_TARGETS = ("lm_head",)  # VITA never adapts the output head


def _linear_types() -> tuple:
    # bnb layers subclass nn.Linear today; listed so a future bnb that stops doing so still counts.
    # peft and bitsandbytes take seconds to import: only runs that use them pay for it.
    import bitsandbytes as bnb

    return nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def _is_peft_model(module: nn.Module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "base_model")


def find_lora_targets(llm: nn.Module) -> list[str]:
    """VITA's target discovery: the last name component of every Linear layer of the LLM.

    Plain ``nn.Linear`` and bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` count; the output head
    (``lm_head``, or whatever module ``get_output_embeddings`` returns) never does.

    Args:
        llm: the causal LM, not yet wrapped by peft.

    Returns:
        Sorted unique names, e.g. ``["down_proj", "gate_proj", "k_proj", ...]``.
    """
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    linear = _linear_types()
    excluded = set(_EXCLUDED_TARGETS)
    names = set()
    for name, module in llm.named_modules():
        if module is head and name:
            excluded.add(name.rsplit(".", 1)[-1])  # peft matches by last name: the head's would catch it too
        elif name and isinstance(module, linear):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names - excluded)


def resolve_lora_targets(llm: nn.Module, requested: str = "") -> list[str]:
    """The target list for ``--lora_target_modules`` (comma-separated; empty: :func:`find_lora_targets`).

    Raises:
        ValueError: a requested name that matches no Linear layer, listing the available ones.
    """
    available = find_lora_targets(llm)
    wanted = [t.strip() for t in (requested or "").split(",") if t.strip()]
    if not wanted:
        if not available:
            raise ValueError(f"the LLM has no Linear layer for LoRA to adapt; set {TARGETS_FLAG} explicitly")
        return available
    unknown = [t for t in wanted if t not in available]
    if unknown:
        raise ValueError(f"{TARGETS_FLAG} names {', '.join(map(repr, unknown))}, which match no Linear layer of the "
                         f"LLM (the output head is never adapted); available: {', '.join(available)}")
    return list(dict.fromkeys(wanted))


def kbit_load_kwargs(quant: QuantSpec, dtype: torch.dtype, lora_enabled: bool) -> dict:
    """Extra ``from_pretrained`` keyword arguments that load the LLM in ``quant.bits`` bits ({} for 16).

    The compute dtype and the 4-bit storage dtype are the run's ``dtype``: storing the packed 4-bit
    weights in the load dtype lets DeepSpeed partition and cast them like any other tensor.

    Raises:
        ValueError: 4/8 bits without LoRA (``--lora_enable True``).
    """
    if quant.bits not in (4, 8):
        return {}
    if not lora_enabled:
        raise ValueError(f"--bits {quant.bits} loads the LLM quantized, and quantized weights cannot train; "
                         "add --lora_enable True (QLoRA) or use --bits 16")
    from transformers import BitsAndBytesConfig
    from transformers.integrations import is_deepspeed_zero3_enabled

    config = BitsAndBytesConfig(
        load_in_4bit=quant.bits == 4,
        load_in_8bit=quant.bits == 8,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_quant_storage=dtype,
        # The head stays in full precision (VITA also skips its mm parts, which here are separate modules).
        llm_int8_skip_modules=list(_EXCLUDED_TARGETS),
    )
    kwargs = {"quantization_config": config}
    # Quantize straight onto this rank's GPU (VITA does too) instead of on the CPU first; transformers
    # refuses a device_map under ZeRO-3, where the engine moves the (unpartitioned) k-bit model.
    if torch.cuda.is_available() and not is_deepspeed_zero3_enabled():
        kwargs["device_map"] = {"": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))}
    return kwargs


def disable_bnb_cpu_repacking(llm: nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers in their training layout on CPUs with AVX512-BF16.

    bitsandbytes repacks a ``Linear4bit`` weight for a faster CPU kernel on its first eval-mode,
    no-grad forward (e.g. an evaluation pass). That kernel has no backward, so the training steps
    after it silently lose the gradient through the layer, and layers narrower than one quantization
    block fail outright. Training never wants it; this turns it off per layer.

    Returns:
        How many layers were changed.
    """
    count = 0
    for module in llm.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def is_quantized(llm: nn.Module) -> bool:
    """True when the LLM (or the base model under a peft wrapper) holds 4- or 8-bit weights."""
    return any(type(p).__name__ in QUANTIZED_PARAM_TYPES for p in llm.parameters())


def _cast_for_kbit(llm: nn.Module, dtype: torch.dtype) -> None:
    """VITA's casts after wrapping a k-bit LLM: norms in fp32; LoRA weights and embeddings in ``dtype``.

    One deliberate difference: the output head stays fp32 (as peft's preparation left it). It reads
    the fp32 output of the final norm, so VITA's bf16 head only runs under autocast. A DeepSpeed
    bf16 engine casts every floating parameter to bf16 anyway (norms too); these casts matter for
    runs outside it.
    """
    if dtype == torch.float32:
        return
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    for name, module in llm.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in leaf or module is head:
            target = torch.float32
        elif leaf == "embed_tokens" or "lora_" in name:
            target = dtype
        else:
            continue
        for param in module.parameters(recurse=False):
            # Never touch packed bnb weights: their storage dtype is part of the quantization.
            if param.is_floating_point() and type(param).__name__ not in QUANTIZED_PARAM_TYPES:
                param.data = param.data.to(target)


def load_lora_weights(peft_llm: nn.Module, weights: LoraWeights) -> list[str]:
    """Put a saved PEFT adapter's tensors (read by :func:`vitacore.checkpoint.read_lora_weights`) into ``peft_llm``.

    Args:
        peft_llm: the LLM already wrapped with a matching ``LoraConfig``.
        weights: the adapter's tensors and saved config.

    Returns:
        The peft file keys that were loaded.

    Raises:
        ValueError: a saved rank / alpha, keys or shapes that do not fit this model.
    """
    from peft import set_peft_model_state_dict

    _check_saved_config(peft_llm, weights)
    # Only adapter tensors and biases can be in the file: never gather a partitioned base weight.
    touched = [p for n, p in peft_llm.named_parameters() if "lora_" in n or n.endswith(".bias")]
    try:
        with gathered(touched, modifier_rank=0):
            result = set_peft_model_state_dict(peft_llm, weights.state)
    except RuntimeError as err:  # size mismatch
        raise ValueError(f"{weights.origin} does not fit this model (different --lora_r or LLM?): {err}") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{weights.origin}: {len(unexpected)} tensors fit no parameter of this model, "
                         f"e.g. {unexpected[:3]}; was it trained with other {TARGETS_FLAG}?")
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if missing:
        raise ValueError(f"{weights.origin} lacks {len(missing)} LoRA tensors of this model, "
                         f"e.g. {missing[:3]}; set {TARGETS_FLAG} to the targets it was trained with")
    return sorted(weights.state)


def _check_saved_config(peft_llm: nn.Module, weights: LoraWeights) -> None:
    saved = weights.saved_config
    if saved is None:
        return
    ours = peft_llm.peft_config["default"]
    for key, flag in (("r", "--lora_r"), ("lora_alpha", "--lora_alpha")):
        if key in saved and saved[key] != getattr(ours, key):
            raise ValueError(f"{weights.origin} was trained with {key}={saved[key]} but this run "
                             f"has {flag} {getattr(ours, key)}; set {flag} {saved[key]}")


def apply_lora(model: nn.Module, spec: LoraSpec, dtype: torch.dtype, gradient_checkpointing: bool = False,
               weights: Optional[LoraWeights] = None) -> None:
    """Wrap ``model.llm`` in LoRA adapters (in place).

    Steps: for a 4/8-bit LLM (loaded with :func:`kbit_load_kwargs`), peft's
    ``prepare_model_for_kbit_training`` (base frozen, non-quantized weights in fp32, gradient
    checkpointing when asked); ``get_peft_model`` with ``LoraConfig(r, lora_alpha, targets,
    lora_dropout, bias)``; the saved adapter in ``weights`` when given; VITA's k-bit dtype casts
    (norms fp32).

    Args:
        model: a ``VitaModel`` (anything with an ``llm`` attribute).
        spec: the adapters' shape (``--lora_*``).
        dtype: the run's compute dtype (the k-bit casts).
        gradient_checkpointing: the run's ``--gradient_checkpointing`` (k-bit preparation sets it up).
        weights: a saved adapter to start from (``--lora_weight_path``).

    Raises:
        ValueError: LoRA already applied, a bad ``--lora_target_modules`` or an adapter that does not fit.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    llm = model.llm
    if _is_peft_model(llm):
        raise ValueError("the LLM already carries LoRA adapters; apply_lora runs once per model")
    kbit = is_quantized(llm)  # what was loaded, not what the flags say
    if kbit:
        disable_bnb_cpu_repacking(llm)
        # Non-reentrant checkpointing, as the run enables it: no input-grad hook needed.
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=gradient_checkpointing,
                                              gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = resolve_lora_targets(llm, spec.target_modules)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=targets, lora_dropout=spec.dropout,
                        bias=spec.bias, task_type="CAUSAL_LM")
    peft_llm = get_peft_model(llm, config)
    if weights is not None:
        load_lora_weights(peft_llm, weights)
    if kbit:
        _cast_for_kbit(peft_llm, dtype)
    model.llm = peft_llm
