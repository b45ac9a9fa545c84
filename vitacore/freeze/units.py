"""Freeze units: named groups of parameters, declared by the model as name prefixes."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

UNITS = ("llm", "vision_tower", "mm_projector", "audio_encoder", "audio_adapter", "audio_prompt", "state_head")


def assign_units(parameter_names: Iterable[str], unit_prefixes: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Map every parameter name to the one unit whose prefix it starts with.

    Args:
        parameter_names: names as ``model.named_parameters()`` gives them.
        unit_prefixes: unit -> name prefixes (e.g. ``{"mm_projector": ("mm_projector.",)}``).

    Raises:
        ValueError: a name matches no unit or more than one.
    """
    assignment = {}
    for name in parameter_names:
        matches = [unit for unit, prefixes in unit_prefixes.items() if any(name.startswith(p) for p in prefixes)]
        if len(matches) != 1:
            what = "no unit" if not matches else f"several units ({', '.join(matches)})"
            raise ValueError(f"parameter {name!r} belongs to {what}; every parameter must belong to exactly one unit")
        assignment[name] = matches[0]
    return assignment
