"""Optimizer parameter groups: decay / no-decay x per-unit learning rates.

Learning rates by unit, most specific first:

- ``--unit_lr unit=lr,...`` for any unit;
- ``--vision_tower_lr`` for the vision tower, defaulting to ``--mm_projector_lr``;
- ``--mm_projector_lr`` for the projector (VITA-1.5 applied it to the tower only; VITA-1.0 to both);
- ``--learning_rate`` for everything else.

Each group is tagged with ``name`` and ``param_names``. The LR schedule is a torch ``LambdaLR``
multiplier, so these per-group rates survive it (DeepSpeed's own warmup schedulers would overwrite
every group with one value).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch.nn as nn

from vitacore.freeze.units import UNITS, assign_units

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Embedding)


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that get no weight decay: biases, norm weights (RMSNorm too) and embeddings."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()
        for param_name, _ in module.named_parameters(recurse=False):
            if is_norm or param_name == "bias" or param_name.endswith("_bias"):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def unit_learning_rates(learning_rate: float, mm_projector_lr: Optional[float] = None,
                        vision_tower_lr: Optional[float] = None,
                        unit_lr: Optional[Mapping[str, float]] = None,
                        units: Sequence[str] = UNITS) -> dict[str, float]:
    """The learning rate of every unit under the rules above (``units``: the model's unit names)."""
    rates = {}
    if mm_projector_lr is not None:
        rates["mm_projector"] = mm_projector_lr
    tower = vision_tower_lr if vision_tower_lr is not None else mm_projector_lr
    if tower is not None:
        rates["vision_tower"] = tower
    rates.update(unit_lr or {})
    return {unit: rates.get(unit, learning_rate) for unit in units}


def build_param_groups(model: nn.Module, unit_prefixes: Mapping[str, Sequence[str]], learning_rate: float,
                       weight_decay: float, unit_rates: Optional[Mapping[str, float]] = None) -> list[dict]:
    """One group per (unit, decay / no-decay) holding that unit's trainable parameters.

    Args:
        model: the model, with ``requires_grad`` already set by the freeze policy.
        unit_prefixes: unit -> parameter-name prefixes.
        learning_rate: the default LR.
        weight_decay: AdamW decay for the decay groups (no-decay groups get 0).
        unit_rates: unit -> LR (see :func:`unit_learning_rates`); missing units use ``learning_rate``.

    Raises:
        ValueError: nothing is trainable.
    """
    unit_rates = dict(unit_rates or {})
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: the freeze policy froze everything; "
                         "check --stage and the tune_*/freeze_* flags")
    unit_of = assign_units([n for n, _ in params], unit_prefixes)
    skip_decay = no_decay_names(model)
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in params:
        unit, decays = unit_of[name], name not in skip_decay
        group = groups.setdefault((unit, decays), {
            "name": unit if decays else f"{unit}.no_decay",
            "params": [], "param_names": [],
            "lr": unit_rates.get(unit, learning_rate),
            "weight_decay": weight_decay if decays else 0.0,
        })
        group["params"].append(param)
        group["param_names"].append(name)
    order = list(unit_prefixes)
    ordered = [groups[key] for key in sorted(groups, key=lambda k: (order.index(k[0]), not k[1]))]
    _check_coverage(ordered, [n for n, _ in params])
    return ordered


def _check_coverage(groups: Sequence[dict], trainable_names: Sequence[str]) -> None:
    seen = [n for g in groups for n in g["param_names"]]
    if sorted(seen) != sorted(trainable_names):
        missing = set(trainable_names) - set(seen)
        doubled = {n for n in seen if seen.count(n) > 1}
        raise AssertionError(f"param groups do not cover the trainable set once (missing {missing}, doubled {doubled})")


def parse_unit_lr(text: str, units: Sequence[str] = UNITS) -> dict[str, float]:
    """Parse ``--unit_lr`` (``unit=lr,unit=lr``) into ``{unit: lr}``.

    Args:
        text: the flag's value.
        units: the model's unit names to check against.

    Raises:
        ValueError: malformed entry, unknown unit or non-positive rate.
    """
    rates: dict[str, float] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        unit, sep, value = entry.partition("=")
        unit = unit.strip()
        if not sep:
            raise ValueError(f"--unit_lr entry {entry!r} must look like unit=lr, e.g. audio_adapter=1e-4")
        if unit not in units:
            raise ValueError(f"--unit_lr names unknown unit {unit!r}; units: {', '.join(units)}")
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"--unit_lr {unit}={value!r}: not a number") from None
        if rate <= 0:
            raise ValueError(f"--unit_lr {unit}={rate} must be > 0")
        rates[unit] = rate
    return rates


def param_groups_for_run(model: nn.Module, unit_prefixes: Mapping[str, Sequence[str]], optim) -> list[dict]:
    """:func:`build_param_groups` with the LRs a run asks for: ``optim``'s ``learning_rate``,
    ``weight_decay``, ``mm_projector_lr``, ``vision_tower_lr`` and ``unit_lr`` (an
    ``OptimConfig`` of :mod:`vitacore.engine`, or anything with those attributes).

    Raises:
        ValueError: nothing trainable, or ``unit_lr`` naming a unit the model does not declare.
    """
    units = tuple(unit_prefixes)
    rates = unit_learning_rates(optim.learning_rate, optim.mm_projector_lr, optim.vision_tower_lr,
                                parse_unit_lr(optim.unit_lr or "", units), units)
    return build_param_groups(model, unit_prefixes, optim.learning_rate, optim.weight_decay, rates)
