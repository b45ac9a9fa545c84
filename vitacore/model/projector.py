"""Vision projectors: map vision-tower features into the LLM's embedding space."""

from __future__ import annotations

import re

import torch.nn as nn

_MLP_PATTERN = re.compile(r"^mlp(\d+)x_gelu$")
KNOWN_PROJECTOR_TYPES = ("linear", "identity", "mlp{N}x_gelu (e.g. mlp2x_gelu)")


def build_projector(projector_type: str, in_features: int, out_features: int) -> nn.Module:
    """Build a projector by VITA's type name.

    Args:
        projector_type: ``linear``, ``identity`` or ``mlp{N}x_gelu``.
        in_features: width of the vision features (``mm_hidden_size``).
        out_features: the LLM's hidden size.

    Returns:
        The module. ``mlp2x_gelu`` is ``Sequential(Linear, GELU, Linear)`` so its parameter names
        (``0.weight``, ``2.bias``, ...) are the ones VITA's ``mm_projector.bin`` uses.

    Raises:
        ValueError: unknown type, or ``identity`` with mismatched widths.
    """
    if projector_type == "linear":
        return nn.Linear(in_features, out_features)
    if projector_type == "identity":
        if in_features != out_features:
            raise ValueError(
                f"--mm_projector_type identity needs the vision width ({in_features}) to equal the "
                f"LLM hidden size ({out_features}); use linear or mlp2x_gelu instead"
            )
        return nn.Identity()
    match = _MLP_PATTERN.match(projector_type)
    if match and int(match.group(1)) >= 1:
        layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
        for _ in range(int(match.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(out_features, out_features)]
        return nn.Sequential(*layers)
    raise ValueError(
        f"--mm_projector_type {projector_type!r} is unknown; known types: "
        + ", ".join(KNOWN_PROJECTOR_TYPES)
    )
