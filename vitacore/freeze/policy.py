"""Freeze policies: which units train, resolved from parameter names alone.

Priority, highest first (documented in the README):

1. ``frozen_regex``: a matching parameter is frozen, whatever else says.
2. ``trainable_regex``: a matching parameter trains.
3. the unit's mode: ``full`` trains every parameter of the unit; ``frozen`` none; ``lora`` trains
   only LoRA adapter weights inside the unit (its base weights stay frozen), plus biases by
   ``lora_bias``: ``none`` no bias; ``all`` every bias of the unit; ``lora_only`` the biases of the
   layers that carry LoRA adapters (peft keeps them at ``X.base_layer.bias`` beside ``X.lora_A``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import torch.nn as nn

from vitacore.constants import QUANTIZED_PARAM_TYPES
from vitacore.freeze.units import UNITS, assign_units

MODES = ("frozen", "full", "lora")
LORA_BIAS = ("none", "all", "lora_only")
LORA_MARKER = "lora_"

# What a user must do to give the model a unit it lacks.
_MISSING_UNIT_HINTS = {
    "vision_tower": "give --vision_tower",
    "mm_projector": "give --vision_tower (the projector is built with it)",
    "audio_encoder": "give --audio_encoder",
    "audio_adapter": "give --audio_encoder (the adapter is built with it)",
    "audio_prompt": "set --audio_prompt_finetune True --audio_prompt_num N",
    "state_head": "use --model_type qwen2p5_fo_instruct, which has the state head",
}


@dataclass(frozen=True)
class FreezePolicy:
    """Unit -> mode, plus optional regex overrides. Units not named are frozen.

    Attributes:
        modes: ``{unit: "frozen" | "full" | "lora"}``.
        trainable_regex: parameters whose name matches (``re.search``) also train.
        frozen_regex: parameters whose name matches are frozen (wins over everything).
        lora_bias: which biases train beside the LoRA weights of ``lora`` units (``--lora_bias``).
    """

    modes: Mapping[str, str] = field(default_factory=dict)
    trainable_regex: Optional[str] = None
    frozen_regex: Optional[str] = None
    lora_bias: str = "none"

    def __post_init__(self):
        # Unit names are checked against the model's units when the policy meets a model; any
        # model may declare its own units (a custom script's ``encoder`` / ``head``).
        for unit, mode in self.modes.items():
            if mode not in MODES:
                raise ValueError(f"freeze policy gives unit {unit!r} mode {mode!r}; modes: {', '.join(MODES)}")
        if self.lora_bias not in LORA_BIAS:
            raise ValueError(f"--lora_bias {self.lora_bias!r} is not one of: {', '.join(LORA_BIAS)}")

    def mode(self, unit: str) -> str:
        return self.modes.get(unit, "frozen")

    def trained_units(self) -> list[str]:
        """Units in ``full`` or ``lora`` mode (vitacore's units in their canonical order first)."""
        ordered = [u for u in UNITS if u in self.modes] + [u for u in self.modes if u not in UNITS]
        return [unit for unit in ordered if self.mode(unit) != "frozen"]

    def check_units(self, unit_prefixes: Mapping[str, Sequence[str]]) -> None:
        """Refuse units the model does not declare.

        Raises:
            ValueError: naming the unit and the declared ones.
        """
        for unit in self.modes:
            if unit not in unit_prefixes:
                raise ValueError(f"freeze policy names unknown unit {unit!r}; units: {', '.join(unit_prefixes)}")

    def eval_units(self, units: Sequence[str] = UNITS) -> tuple[str, ...]:
        """Frozen units kept in eval mode while training.

        Frozen encoders, projectors and heads stay in eval mode so their dropout and norm statistics
        never move. A frozen LLM is the exception: it follows the engine's mode, because gradients
        still flow through it to the projector and gradient checkpointing only runs in train mode.
        """
        return tuple(u for u in units if u != "llm" and self.mode(u) == "frozen")

    def resolve(self, parameter_names: Iterable[str], unit_prefixes: Mapping[str, Sequence[str]]) -> dict[str, bool]:
        """``{name: trainable}``: a pure function of the names (no model, no DeepSpeed).

        Raises:
            ValueError: a name in no unit, or a regex that matches no parameter.
        """
        self.check_units(unit_prefixes)
        return self._resolve(assign_units(parameter_names, unit_prefixes))

    def _resolve(self, assignment: Mapping[str, str]) -> dict[str, bool]:
        names = list(assignment)
        adapted = _lora_adapted_modules(names) if self.lora_bias == "lora_only" else set()
        trainable = {}
        for name, unit in assignment.items():
            mode = self.mode(unit)
            trainable[name] = mode == "full" or (mode == "lora" and self._lora_trains(name, adapted))
        for flag, pattern, value in (("--trainable_regex", self.trainable_regex, True),
                                     ("--frozen_regex", self.frozen_regex, False)):
            if not pattern:
                continue
            matched = [n for n in names if re.search(pattern, n)]
            if not matched:
                raise ValueError(f"{flag} {pattern!r} matches no parameter; names look like {names[0]!r}")
            for name in matched:
                trainable[name] = value
        return trainable

    def _lora_trains(self, name: str, adapted: set) -> bool:
        if LORA_MARKER in name:
            return True
        if self.lora_bias == "none" or not name.endswith(".bias"):
            return False
        return self.lora_bias == "all" or _bias_owner(name) in adapted

    def check_model(self, model: nn.Module, unit_prefixes: Mapping[str, Sequence[str]]) -> None:
        """Refuse units asked to train that the model lacks, and ``lora`` for units without Linear layers.

        Raises:
            ValueError: naming the unit and what to do.
        """
        self.check_units(unit_prefixes)
        assignment = assign_units([n for n, _ in model.named_parameters()], unit_prefixes)
        self._check_present(set(assignment.values()), model, unit_prefixes)

    def _check_present(self, present: set, model: nn.Module, unit_prefixes: Mapping[str, Sequence[str]]) -> None:
        for unit in self.trained_units():
            if unit not in present:
                raise ValueError(f"unit {unit!r} is set to {self.mode(unit)} but this model has no {unit}; "
                                 f"{_MISSING_UNIT_HINTS.get(unit, 'remove it from the policy')}")
            if self.mode(unit) == "lora":
                prefixes = tuple(unit_prefixes[unit])
                has_linear = any(isinstance(module, nn.Linear) for name, module in model.named_modules()
                                 if f"{name}.".startswith(prefixes))
                if not has_linear:
                    raise ValueError(f"unit {unit!r} is set to lora but has no Linear layer to adapt; "
                                     "use full or frozen for it")

    def apply(self, model: nn.Module, unit_prefixes: Mapping[str, Sequence[str]]) -> dict[str, bool]:
        """Set ``requires_grad`` on every parameter exactly; record :meth:`eval_units` on the model
        (``model.eval_units``) so those units stay in eval mode while training.

        Raises:
            ValueError: a unit the model lacks, or a policy that leaves nothing trainable.
        """
        self.check_units(unit_prefixes)
        assignment = assign_units([n for n, _ in model.named_parameters()], unit_prefixes)
        self._check_present(set(assignment.values()), model, unit_prefixes)
        trainable = self._resolve(assignment)
        if not any(trainable.values()):
            trained = self.trained_units() or ["none"]
            raise ValueError(
                f"the freeze policy leaves no trainable parameter (training units: {', '.join(trained)}); "
                "check --stage, the tune_*/freeze_* flags and --frozen_regex")
        params = dict(model.named_parameters())
        quantized = [n for n, on in trainable.items() if on and type(params[n]).__name__ in QUANTIZED_PARAM_TYPES]
        if quantized:
            raise ValueError(f"the freeze policy trains {quantized[0]!r}, a 4/8-bit weight (--bits), which cannot "
                             "train; give its unit mode lora (--lora_enable True), load it with --bits 16, or "
                             "exclude it from --trainable_regex")
        for name, param in params.items():
            param.requires_grad_(trainable[name])
        if hasattr(model, "eval_units"):
            model.eval_units = self.eval_units(tuple(unit_prefixes))
        return trainable


def _bias_owner(bias_name: str) -> str:
    """The layer a bias belongs to, seen through peft's wrapper: ``X.base_layer.bias`` -> ``X``."""
    owner = bias_name[: -len(".bias")]
    return owner[: -len(".base_layer")] if owner.endswith(".base_layer") else owner


def _lora_adapted_modules(names: Iterable[str]) -> set:
    """Layers that carry LoRA adapters: ``X`` for every ``X.lora_A.<adapter>.weight`` name."""
    return {name.split(".lora_A.", 1)[0] for name in names if ".lora_A." in name}


def unit_summary(model: nn.Module, unit_prefixes: Mapping[str, Sequence[str]], policy: FreezePolicy,
                 assignment: Optional[Mapping[str, str]] = None) -> dict:
    """``{unit: {"trainable": int, "total": int, "mode": str, "dtype": str}}`` for units present.

    ``assignment`` (name -> unit) saves recomputing it when the caller has it already.
    """
    params = dict(model.named_parameters())
    if assignment is None:
        assignment = assign_units(params, unit_prefixes)
    summary: dict[str, dict] = {}
    for name, unit in assignment.items():
        entry = summary.setdefault(unit, {"trainable": 0, "total": 0, "mode": policy.mode(unit), "dtype": None})
        count = getattr(params[name], "ds_numel", params[name].numel())
        entry["total"] += count
        entry["trainable"] += count if params[name].requires_grad else 0
        entry["dtype"] = str(params[name].dtype).replace("torch.", "")
    return summary
