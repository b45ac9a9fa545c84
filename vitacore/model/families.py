"""LLM families: VITA's ``--model_type`` values, their default templates, pad tokens and attention.

VITA picks a model class per ``--model_type``; vitacore loads any causal LM by its config and keeps
``--model_type`` for what it still decides: the tokenizer's pad token, the default ``--version``
(chat template) and the fo model's state head. When the user does not set them, both are inferred
from the LLM's config and said in the log; a stage preset's value is kept only when it fits the
LLM's family (stage ``fo``'s ``qwen2p5_fo_instruct`` on a Qwen2 LLM), since presets describe VITA's
Qwen2.5 runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.utils import is_flash_attn_2_available

from vitacore.console import logger

# VITA's --model_type values -> the transformers config model_type of the LLM they were made for.
MODEL_TYPE_FAMILY = {
    "qwen2p5_instruct": "qwen2",
    "qwen2p5_fo_instruct": "qwen2",
    "nemo": "mistral",
    "mixtral-8x7b": "mixtral",
    "llama3-8b": "llama",
}
# LLM config model_type -> inferred --model_type. VITA's own checkpoint types are read as theirs.
INFERRED_MODEL_TYPE = {
    "qwen2": "qwen2p5_instruct",
    "mistral": "nemo",
    "mixtral": "mixtral-8x7b",
    "llama": "llama3-8b",
    "vita-Qwen2": "qwen2p5_instruct",
    "vita-fo-Qwen2": "qwen2p5_fo_instruct",
    "vita-Mistral": "nemo",
    "vita-mixtral": "mixtral-8x7b",
}
# --model_type -> the --version (template) used when --version is not given.
DEFAULT_VERSION = {
    "qwen2p5_instruct": "qwen2p5_instruct",
    "qwen2p5_fo_instruct": "qwen2p5_instruct",
    "nemo": "nemo",
    "mixtral-8x7b": "mixtral_two",
    "llama3-8b": "llama3",
}
INFERRED_SOURCE = "inferred from the LLM's config"


def _known() -> str:
    return ", ".join(MODEL_TYPE_FAMILY)


def _family(model_type: Optional[str]) -> Optional[str]:
    return MODEL_TYPE_FAMILY.get(model_type or "")


@dataclass(frozen=True)
class ModelTypeChoice:
    """The ``--model_type`` / ``--version`` a run uses, and which of them were inferred.

    Attributes:
        model_type: VITA's model type, or None for an LLM of another family run with ``--version``.
        version: the chat template's name.
        inferred: the names among ``("model_type", "version")`` this choice filled in (the caller
            records them as :data:`INFERRED_SOURCE`).
    """

    model_type: Optional[str]
    version: Optional[str]
    inferred: tuple[str, ...] = ()


def infer_model_type(llm_model_type: str, llm_path: str, model_type: Optional[str], version: Optional[str],
                     model_type_explicit: bool, version_explicit: bool,
                     model_type_source: str = "default") -> ModelTypeChoice:
    """``--model_type`` and ``--version`` for the LLM at ``llm_path``, where the user set neither.

    Rules: a value the user gave (flag or YAML) is kept (a family mismatch is only noted); a
    preset's ``model_type`` is kept when it is of the LLM's family, else replaced by the inferred
    one; ``--version`` not given follows the model type (a preset's version only with the preset's
    model type). An LLM of another family needs ``--version`` (it then gets the generic pad rule)
    or a ``--model_type``. Each decision is logged.

    Args:
        llm_model_type: the LLM config's ``model_type`` (VITA's ``vita-*`` types included).
        llm_path: where the LLM comes from (for messages).
        model_type / version: the run's current values (user's, preset's or None).
        model_type_explicit / version_explicit: whether the user set them.
        model_type_source: where the current model type came from (said in the log).

    Raises:
        ValueError: an unknown ``--model_type``, or an LLM family with no VITA model type and neither
            flag given.
    """
    inferred = INFERRED_MODEL_TYPE.get(llm_model_type)
    family = MODEL_TYPE_FAMILY.get(inferred or "")
    where = f"the LLM's config ({llm_path!r}: model_type {llm_model_type!r})"
    keep_version = version_explicit
    filled: list[str] = []
    if model_type_explicit:
        if model_type not in MODEL_TYPE_FAMILY:
            raise ValueError(f"--model_type {model_type!r} is not one of VITA's model types: {_known()}")
        if family and _family(model_type) != family:
            logger.info(f"vitacore: note: --model_type {model_type} is for {_family(model_type)} LLMs but {where} is "
                        f"{family}; kept as given (it sets the pad token rule and the default template only)")
    elif model_type and inferred and _family(model_type) == family:
        keep_version = keep_version or version is not None  # the preset's pairing of type and template
        logger.info(f"vitacore: --model_type {model_type} ({model_type_source}) fits {where}")
    elif inferred:
        replaced = f"; the {model_type_source} value {model_type} is for another family" if model_type else ""
        model_type = inferred
        filled.append("model_type")
        logger.info(f"vitacore: --model_type not given: {inferred}, inferred from {where}{replaced}")
    elif keep_version:
        model_type = None
        filled.append("model_type")
        logger.info(f"vitacore: {where} is not one of VITA's families "
                    f"({', '.join(sorted(set(MODEL_TYPE_FAMILY.values())))}); no --model_type: the generic pad "
                    f"token rule applies and --version {version} is the template")
    else:
        raise ValueError(
            f"{where} is not a family VITA has a --model_type for (qwen2, mistral, mixtral, llama); pass "
            f"--version TEMPLATE for its chat template (it then gets the generic pad token rule), or --model_type "
            f"(one of: {_known()}) if it follows one of those families' formats")
    if not keep_version:
        version = DEFAULT_VERSION[model_type]
        filled.append("version")
        logger.info(f"vitacore: --version not given: template {version}, the default for --model_type {model_type}")
    return ModelTypeChoice(model_type, version, tuple(filled))


def apply_pad_rule(tokenizer, model_type: Optional[str], path: str):
    """Give ``tokenizer`` a pad token by VITA's rule: none -> unk, else eos; ``llama3-8b``: always eos.

    Padding never hides a real token: attention masks and labels come from sequence lengths, so a
    pad equal to eos leaves the answers' eos supervised.

    Raises:
        ValueError: the tokenizer has none of pad, unk and eos.
    """
    if model_type == "llama3-8b":
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer at {path!r} has no eos token, which --model_type llama3-8b pads with")
        if tokenizer.pad_token != tokenizer.eos_token:
            tokenizer.pad_token = tokenizer.eos_token
            logger.info(f"vitacore: pad token = eos {tokenizer.eos_token!r} (VITA's rule for --model_type llama3-8b)")
        return tokenizer
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token or tokenizer.eos_token
        if fallback is None:
            raise ValueError(f"the tokenizer at {path!r} has no pad, unk or eos token; add a pad_token to its "
                             "tokenizer_config.json")
        tokenizer.pad_token = fallback
        kind = "unk" if tokenizer.unk_token else "eos"
        logger.info(f"vitacore: the tokenizer has no pad token; pad token = {kind} {fallback!r}")
    return tokenizer


def attention_implementation(dtype: torch.dtype, what: str = "the LLM") -> str:
    """``flash_attention_2`` when flash_attn is installed, CUDA is there and ``dtype`` is 16-bit; else ``sdpa``."""
    if not torch.cuda.is_available():
        reason = "no CUDA device"
    elif not is_flash_attn_2_available():
        reason = "the flash_attn package is not installed (pip install 'vitacore[gpu]')"
    elif dtype not in (torch.float16, torch.bfloat16):
        reason = f"flash_attention_2 needs bf16/fp16, the run is {str(dtype).removeprefix('torch.')}"
    else:
        logger.info(f"vitacore: attention for {what}: flash_attention_2")
        return "flash_attention_2"
    logger.info(f"vitacore: attention for {what}: sdpa ({reason})")
    return "sdpa"
