"""What a resumed run may change: its resolved config compared with the checkpoint's ``config.yaml``.

A checkpoint restores the optimizer, the schedule's position and the data position, so a flag that
changes what the run computes (learning rate, schedule, total steps, data, maximum length,
precision, ZeRO stage, what trains) would be silently ignored or would silently mix two runs. Such
a change is refused unless the user names it in ``--allow_resume_changes``. Flags that only change
bookkeeping (logging, saving cadence, trackers, workers, timeouts) may change freely; every
difference is printed either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import yaml

# Flags that do not change what the run computes: they may differ on resume.
BOOKKEEPING_FLAGS = frozenset({
    "output_dir", "resume_from_checkpoint", "allow_resume_changes", "logging_steps", "save_strategy", "save_steps",
    "save_total_limit", "eval_strategy", "eval_steps", "eval_data_path", "per_device_eval_batch_size",
    "eval_generate", "report_to", "run_name", "plot_loss", "report_json", "dry_run", "cache_dir",
    "dataloader_num_workers", "dataloader_persistent_workers", "dataloader_prefetch_factor", "local_rank",
    "ddp_timeout", "trust_remote_code", "remove_unused_columns", "mpt_attn_impl", "lazy_preprocess",
    "length_cache_dir", "loss_chunk_size", "zero3_frozen_parts",
})


@dataclass(frozen=True)
class ConfigChange:
    """One flag whose value differs between the checkpoint's run and this one."""

    flag: str
    saved: Any
    current: Any
    allowed: bool  # bookkeeping, or named in --allow_resume_changes

    def __str__(self) -> str:
        return f"--{self.flag}: {self.saved!r} -> {self.current!r}"


def flatten_config(sectioned: Mapping[str, Any]) -> dict[str, Any]:
    """``{"model": {...}, "training": {...}, "stage": "2"}`` -> one flat ``{flag: value}`` mapping."""
    flat: dict[str, Any] = {}
    for key, value in sectioned.items():
        if isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def read_saved_config(path: str) -> Optional[dict[str, Any]]:
    """The flat config of a checkpoint's ``config.yaml``; None when there is none (older checkpoints).

    Raises:
        ValueError: the file is not readable YAML (naming it).
    """
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: the checkpoint's run config cannot be read ({err}); resume from another "
                         "checkpoint with --resume_from_checkpoint <folder>") from None
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: the checkpoint's run config is not a mapping of flags; resume from another "
                         "checkpoint with --resume_from_checkpoint <folder>")
    return flatten_config(loaded)


def parse_allowed(value: Optional[str]) -> frozenset[str]:
    """``--allow_resume_changes "learning_rate, --max_steps"`` -> ``{"learning_rate", "max_steps"}``."""
    if not value:
        return frozenset()
    return frozenset(part.strip().lstrip("-") for part in str(value).split(",") if part.strip())


def _same_path(saved: str, current: str) -> bool:
    """Two spellings of one file (``./llm`` and ``/abs/llm``) are the same value."""
    return os.path.realpath(os.path.expanduser(saved)) == os.path.realpath(os.path.expanduser(current))


def _same(saved: Any, current: Any) -> bool:
    if saved == current:
        return True
    if isinstance(saved, (int, float)) and isinstance(current, (int, float)) and not isinstance(saved, bool):
        return float(saved) == float(current)  # YAML may give 1 for 1.0
    if isinstance(saved, str) and isinstance(current, str):
        saved_parts, current_parts = saved.split(","), current.split(",")  # comma lists of paths
        if len(saved_parts) == len(current_parts) and all(
                (os.path.exists(a.strip()) or os.path.exists(b.strip())) and _same_path(a.strip(), b.strip())
                for a, b in zip(saved_parts, current_parts)):
            return True
    return False


def compare_configs(saved: Mapping[str, Any], current: Mapping[str, Any],
                    allowed: frozenset[str] = frozenset()) -> list[ConfigChange]:
    """Every flag whose value differs, marked allowed (bookkeeping or named) or not.

    Args:
        saved: the checkpoint's flat config (:func:`read_saved_config`).
        current: this run's flat resolved config (``RunConfig.flat_dict()`` after the stage preset).
        allowed: flags named in ``--allow_resume_changes``.
    """
    changes = []
    for flag in sorted(set(saved) | set(current)):
        if flag not in saved or flag not in current:
            continue  # a flag one version of vitacore does not have: its default applies
        if not _same(saved[flag], current[flag]):
            changes.append(ConfigChange(flag, saved[flag], current[flag],
                                        flag in BOOKKEEPING_FLAGS or flag in allowed))
    return changes


def check_resume_changes(changes: list[ConfigChange], checkpoint: str) -> list[str]:
    """The notes to print for allowed changes.

    Raises:
        ValueError: some change is not allowed; the message lists every difference and the flag to allow it.
    """
    refused = [c for c in changes if not c.allowed]
    if refused:
        listed = "; ".join(str(c) for c in refused)
        names = ",".join(c.flag for c in refused)
        raise ValueError(f"resuming from {checkpoint!r} with a different config: {listed}. The checkpoint's optimizer, "
                         "schedule and data position belong to its own settings, so these changes would be ignored "
                         "or mix two runs. Go back to the checkpoint's values (its config.yaml), start a fresh run "
                         f"in another --output_dir, or allow them by name: --allow_resume_changes {names}")
    return [f"resuming with a changed config ({'allowed' if c.flag not in BOOKKEEPING_FLAGS else 'bookkeeping'}): "
            f"{c}" for c in changes]
