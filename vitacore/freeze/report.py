"""The trainable-parameter report: a table for people and a JSON for tools."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch.nn as nn

from vitacore.freeze.policy import FreezePolicy, unit_summary
from vitacore.freeze.units import assign_units


def build_report(model: nn.Module, unit_prefixes: Mapping[str, Sequence[str]], policy: FreezePolicy,
                 param_groups: Sequence[dict]) -> dict:
    """The report as a JSON-able dict: ``units``, ``trainable_names``, ``param_groups``.

    Each ``param_groups`` entry has ``name``, ``lr``, ``weight_decay``, ``units`` and ``num_params``.
    """
    params = dict(model.named_parameters())
    names = list(params)
    unit_of = assign_units(names, unit_prefixes)
    units = unit_summary(model, unit_prefixes, policy, unit_of)
    groups = []
    for group in param_groups:
        group_names = group.get("param_names", [])
        groups.append({
            "name": group.get("name"),
            "lr": group.get("initial_lr", group["lr"]),  # the base LR, before any schedule multiplier
            "weight_decay": group["weight_decay"],
            "units": sorted({unit_of[n] for n in group_names}),
            "num_params": sum(getattr(params[n], "ds_numel", params[n].numel()) for n in group_names),
        })
    for unit, entry in units.items():
        lrs = sorted({g["lr"] for g in groups if unit in g["units"]})
        entry["lr"] = lrs[0] if len(lrs) == 1 else (lrs or None)
    return {"units": units, "trainable_names": [n for n in names if params[n].requires_grad], "param_groups": groups}


def format_report(report: dict) -> str:
    """A fixed-width table of every unit: trainable / total parameters, mode, LR, dtype."""
    header = f"{'unit':<15}{'trainable':>12}{'total':>12}  {'mode':<8}{'lr':<12}{'dtype':<9}"
    lines = ["trainable parameters", header, "-" * len(header)]
    total_trainable = total = 0
    for unit, entry in report["units"].items():
        lr = entry.get("lr")
        lr_text = "-" if lr is None else (f"{lr:g}" if isinstance(lr, float) else ",".join(f"{v:g}" for v in lr))
        lines.append(f"{unit:<15}{entry['trainable']:>12,}{entry['total']:>12,}  {entry['mode']:<8}{lr_text:<12}"
                     f"{entry['dtype']:<9}")
        total_trainable += entry["trainable"]
        total += entry["total"]
    lines.append("-" * len(header))
    share = 100.0 * total_trainable / max(1, total)
    lines.append(f"{'all':<15}{total_trainable:>12,}{total:>12,}  ({share:.2f}% trainable)")
    return "\n".join(lines)
