"""Offline tools: a resumable checkpoint or a LoRA run's output -> a full export.

    python -m vitacore.checkpoint export CKPT_DIR OUT_DIR [--dtype bfloat16|float32] [--trust_remote_code True]
    python -m vitacore.checkpoint merge-lora LORA_DIR OUT_DIR [--dtype bfloat16|float32] [--trust_remote_code True]

Both rebuild the run's model from the ``config.yaml`` saved beside the weights (frozen parts come
from the same paths the run used), put the trained weights in, and write a full export. A tower
whose folder holds code (InternViT) needs the tool's own ``--trust_remote_code True``: the value
recorded in ``config.yaml`` (a file that may come from elsewhere) is never taken as consent.
"""

from __future__ import annotations

import argparse
import glob
import os
import pickle
import sys
from typing import Callable, Optional, Sequence

import torch

from vitacore.checkpoint import load_non_lora_trainables, save_full_export
from vitacore.checkpoint.resumable import COMPLETE_MARKER, CONFIG_FILE, DEEPSPEED_TAG, read_trainer_state
from vitacore.config import RunConfig, load_yaml_config
from vitacore.console import enable_console, logger
from vitacore.recipes.model import build_model_from_config

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
ADAPTER_CONFIG = "adapter_config.json"


def yes_no(text: str) -> bool:
    """An argparse type for ``True`` / ``False`` (also 1/0, yes/no), as the run's boolean flags take."""
    word = text.strip().lower()
    if word in ("true", "1", "yes", "y", "on"):
        return True
    if word in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _run_config(folder: str, flag: str, lora: Optional[bool] = None, trust_remote_code: bool = False) -> RunConfig:
    """The run config saved in ``folder``, for a one-process rebuild; ``trust_remote_code`` (the tool's own
    flag) replaces the saved value."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {folder!r}: no {CONFIG_FILE} there (expected a vitacore checkpoint-<step> "
                                "folder or a run's output folder)")
    config = load_yaml_config(path)
    t = config.training
    t.deepspeed = None  # one process, nothing partitioned
    config.model.trust_remote_code = trust_remote_code  # consent comes from the user, not from the folder
    if lora is not None:
        t.lora_enable = lora
        if lora is False and t.bits in (4, 8):
            t.bits = 16  # merging needs the base weights in 16/32-bit, not quantized
    return config


def _deepspeed_data_types() -> list[type]:
    """The plain data types DeepSpeed's ZeRO optimizer files pickle besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load_state_file(file: str, checkpoint: str, prog: str) -> dict:
    """One DeepSpeed state file, unpickled weights-only (tensors, containers and DeepSpeed's data types).

    Raises:
        ValueError: naming the file: it references anything else (a pickle that would run code), or it
            is unreadable or truncated.
    """
    try:
        with torch.serialization.safe_globals(_deepspeed_data_types()):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        detail = (str(err).strip().splitlines() or [""])[-1]
        raise ValueError(f"{prog} {checkpoint!r}: {file} holds more than DeepSpeed's state ({detail}); unpickling "
                         "it could run code, so it is not loaded") from None
    except Exception as err:  # whatever torch raises on a truncated or corrupt file
        detail = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{prog} {checkpoint!r}: {file} is unreadable or truncated ({type(err).__name__}: "
                         f"{detail}); the checkpoint is damaged") from None


def _deepspeed_consolidated(checkpoint: str, state_dir: str, prog: str) -> dict[str, torch.Tensor]:
    """ZeRO-1/2/3: DeepSpeed's own consolidation (``zero_to_fp32``), which unpickles its files fully.

    Full unpickling would run whatever code a crafted file carries, so every file is first loaded
    weights-only with only DeepSpeed's plain data types allowed: a file that passes references
    nothing else, and DeepSpeed's loader then constructs nothing else from it.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for file in sorted(glob.glob(os.path.join(state_dir, "*.pt"))):
        _load_state_file(file, checkpoint, prog)
    return dict(get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag=DEEPSPEED_TAG))


def _trained_weights(checkpoint: str, prog: str = "export") -> dict[str, torch.Tensor]:
    """The fp32 values of the trainable parameters in a checkpoint, consolidated over ranks."""
    state_dir = os.path.join(checkpoint, DEEPSPEED_TAG)
    if glob.glob(os.path.join(state_dir, "*optim_states.pt")) and os.path.exists(
            os.path.join(checkpoint, "zero_to_fp32.py")):
        return _deepspeed_consolidated(checkpoint, state_dir, prog)
    # ZeRO-0 (one process): the module entry holds the trainable weights themselves.
    files = sorted(glob.glob(os.path.join(state_dir, "mp_rank_*_model_states.pt")))
    if not files:
        raise FileNotFoundError(f"{prog} {checkpoint!r}: no DeepSpeed state in {state_dir!r}")
    state = _load_state_file(files[0], checkpoint, prog)
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise ValueError(f"{prog} {checkpoint!r}: {files[0]} has no 'module' entry; not DeepSpeed's model state")
    return dict(state["module"])


def _drop_adapter_flags(config, trainable: set[str]) -> None:
    # The checkpoint holds these units' trained values; the run's starting files may be long gone.
    if any(n.startswith("mm_projector.") for n in trainable):
        config.model.pretrain_mm_mlp_adapter = None
    if any(n.startswith("audio_adapter.") for n in trainable):
        config.model.pretrain_audio_mlp_adapter = None


def rebuild_from_checkpoint(checkpoint: str, prog: str, build: Optional[Callable] = None,
                            trust_remote_code: bool = False) -> tuple:
    """The model a ``checkpoint-N`` trained: rebuilt from its config.yaml (frozen parts from the run's
    own paths), its trained tensors loaded from the DeepSpeed state.

    Args:
        checkpoint: the checkpoint folder.
        prog: the tool, for messages (``export``).
        build: config -> (bundle, config); default :func:`vitacore.recipes.build_model_from_config`.
        trust_remote_code: allow running a tower folder's Python files (the tool's flag, not config.yaml's).

    Returns:
        ``(bundle, config, number of trained tensors loaded)``.

    Raises:
        ValueError: trained tensors missing from the state, or tensors that fit no parameter.
    """
    trainable = set(read_trainer_state(checkpoint).get("identity", {}).get("trainable", {}))
    config = _run_config(checkpoint, prog, trust_remote_code=trust_remote_code)
    _drop_adapter_flags(config, trainable)
    bundle, config = (build or build_model_from_config)(config)
    weights = _trained_weights(checkpoint, prog)
    missing = trainable - set(weights)
    if missing:
        raise ValueError(f"{prog} {checkpoint!r}: the engine state lacks trained parameters {sorted(missing)[:5]}")
    result = bundle.model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{prog} {checkpoint!r}: weights {result.unexpected_keys[:5]} fit no parameter of the "
                         "model rebuilt from its config.yaml")
    return bundle, config, len(weights)


def export_checkpoint(checkpoint: str, out_dir: str, dtype: torch.dtype = torch.bfloat16,
                      trust_remote_code: bool = False) -> dict:
    """Consolidate a resumable checkpoint into a full export in ``out_dir``.

    A LoRA checkpoint is merged first (see :func:`merge_lora_folder`). ``trust_remote_code`` allows
    running the Python files of a tower folder the run used (InternViT).

    Returns:
        ``{artifact name: path}`` written.

    Raises:
        FileNotFoundError / ValueError: naming the checkpoint and what is missing or does not fit.
    """
    if not os.path.exists(os.path.join(checkpoint, COMPLETE_MARKER)):
        raise FileNotFoundError(f"export {checkpoint!r}: not a complete checkpoint (no {COMPLETE_MARKER}); pass a "
                                "checkpoint-<step> folder of a run's --output_dir")
    if os.path.exists(os.path.join(checkpoint, ADAPTER_CONFIG)):
        return merge_lora_folder(checkpoint, out_dir, dtype, trust_remote_code)
    bundle, config, count = rebuild_from_checkpoint(checkpoint, "export", trust_remote_code=trust_remote_code)
    logger.info(f"loaded {count} trained tensors from {checkpoint}")
    return save_full_export(bundle.model, bundle.tokenizer, out_dir, is_main=True, dtype=dtype)


def merge_lora_folder(folder: str, out_dir: str, dtype: torch.dtype = torch.bfloat16,
                      trust_remote_code: bool = False) -> dict:
    """Merge a LoRA run's adapter into its base LLM and write a full export.

    ``folder`` is a LoRA run's output folder or one of its checkpoints: it holds ``config.yaml``,
    the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and
    ``non_lora_trainables.bin``. The base LLM is loaded unquantized even for ``--bits 4/8`` runs.
    ``trust_remote_code`` allows running the Python files of a tower folder the run used (InternViT).
    """
    from peft import PeftModel  # seconds to import: LoRA folders only

    if not os.path.exists(os.path.join(folder, ADAPTER_CONFIG)):
        raise FileNotFoundError(f"merge-lora {folder!r}: no {ADAPTER_CONFIG} (not the output of a --lora_enable run)")
    config = _run_config(folder, "merge-lora", lora=False, trust_remote_code=trust_remote_code)
    non_lora = os.path.join(folder, "non_lora_trainables.bin")
    if os.path.exists(non_lora):
        config.model.pretrain_mm_mlp_adapter = config.model.pretrain_audio_mlp_adapter = None
    bundle, _ = build_model_from_config(config)  # frozen parts from the run's own paths
    model = bundle.model
    model.llm = PeftModel.from_pretrained(model.llm, folder).merge_and_unload()
    if os.path.exists(non_lora):
        loaded = load_non_lora_trainables(non_lora, model, origin=f"merge-lora {folder!r}")
        logger.info(f"loaded {len(loaded)} non-LoRA trained tensors from {non_lora}")
    return save_full_export(model, bundle.tokenizer, out_dir, is_main=True, dtype=dtype)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``python -m vitacore.checkpoint`` command line."""
    parser = argparse.ArgumentParser(prog="python -m vitacore.checkpoint", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("export", "resumable checkpoint -> full export"),
                            ("merge-lora", "LoRA adapter + base LLM -> full export")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("source", help="checkpoint-<step> folder" if name == "export" else
                             "a --lora_enable run's output folder or checkpoint")
        command.add_argument("out_dir", help="where the full export goes")
        command.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES), help="weights' dtype")
        command.add_argument("--trust_remote_code", type=yes_no, default=False, metavar="True|False",
                             help="allow running the Python files of a tower folder whose config.json has an "
                                  "auto_map (InternViT); only for folders you trust (config.yaml's value is "
                                  "not used)")
    args = parser.parse_args(argv)
    enable_console()
    run = export_checkpoint if args.command == "export" else merge_lora_folder
    try:
        written = run(args.source, args.out_dir, _DTYPES[args.dtype], args.trust_remote_code)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for _, path in sorted(written.items()):
        print(f"wrote {path}")
    return 0
