"""Freeze policies: which units train, resolved from parameter names alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch.nn as nn

from vitacore.freeze.units import UNITS, assign_units

MODES = ("frozen", "full", "lora")


@dataclass(frozen=True)
class FreezePolicy:
    """Unit -> mode. Units not named are frozen.

    Attributes:
        modes: ``{unit: "frozen" | "full" | "lora"}``.
    """

    modes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for unit, mode in self.modes.items():
            if unit not in UNITS:
                raise ValueError(f"freeze policy names unknown unit {unit!r}; units: {', '.join(UNITS)}")
            if mode not in MODES:
                raise ValueError(f"freeze policy gives unit {unit!r} mode {mode!r}; modes: {', '.join(MODES)}")

    def mode(self, unit: str) -> str:
        return self.modes.get(unit, "frozen")

    def trained_units(self) -> list[str]:
        """Units in ``full`` or ``lora`` mode."""
        return [unit for unit in UNITS if self.mode(unit) != "frozen"]

    def resolve(self, parameter_names: Iterable[str], unit_prefixes: Mapping[str, Sequence[str]]) -> dict[str, bool]:
        """Pure function of names: ``{name: trainable}`` (``lora`` units train only their adapters,
        which do not exist before LoRA wrapping, so their base weights resolve frozen)."""
        assignment = assign_units(parameter_names, unit_prefixes)
        return {name: self.mode(unit) == "full" for name, unit in assignment.items()}

    def apply(self, model: nn.Module, unit_prefixes: Mapping[str, Sequence[str]]) -> dict[str, bool]:
        """Set ``requires_grad`` on every parameter exactly, and record frozen units on the model
        (``model.eval_units``) so they stay in eval mode while training: a frozen encoder's dropout
        and norm statistics must not move.

        Raises:
            ValueError: the policy leaves nothing trainable.
        """
        trainable = self.resolve([n for n, _ in model.named_parameters()], unit_prefixes)
        if not any(trainable.values()):
            trained = [u for u, m in self.modes.items() if m != "frozen"] or ["none"]
            raise ValueError(
                f"the freeze policy leaves no trainable parameter (training units: {', '.join(trained)}; "
                "are they present in this model?); check --stage and the tune_*/freeze_* flags")
        for name, param in model.named_parameters():
            param.requires_grad_(trainable[name])
        if hasattr(model, "eval_units"):
            model.eval_units = self.eval_units()
        return trainable

    def eval_units(self) -> tuple[str, ...]:
        """Frozen units kept in eval mode while training.

        Frozen encoders, projectors and heads stay in eval mode so their dropout and norm statistics
        never move. A frozen LLM is the exception: it follows the engine's mode, because gradients
        still flow through it to the projector and gradient checkpointing only runs in train mode.
        """
        return tuple(u for u in UNITS if u != "llm" and self.mode(u) == "frozen")


def unit_summary(model: nn.Module, unit_prefixes: Mapping[str, Sequence[str]], policy: FreezePolicy) -> dict:
    """``{unit: {"trainable": int, "total": int, "mode": str, "dtype": str}}`` for units present."""
    params = dict(model.named_parameters())
    assignment = assign_units(params, unit_prefixes)
    summary: dict[str, dict] = {}
    for name, unit in assignment.items():
        entry = summary.setdefault(unit, {"trainable": 0, "total": 0, "mode": policy.mode(unit), "dtype": None})
        count = getattr(params[name], "ds_numel", params[name].numel())
        entry["total"] += count
        entry["trainable"] += count if params[name].requires_grad else 0
        entry["dtype"] = str(params[name].dtype).replace("torch.", "")
    return summary
