"""Training FLOPs per step and model FLOPs utilization (MFU), counting the encoders too.

Per module with ``N`` weights (embeddings excluded) that processes ``T`` tokens:

- forward ``2·N·T``;
- backward ``4·N·T`` when its weights train (input and weight gradients), ``2·N·T`` when it is frozen
  but gradients pass through it to something trainable before it, ``0`` otherwise;
- ``+2·N·T`` recomputation when gradient checkpointing is on and a backward runs through it.

Attention scores add ``4·layers·hidden·T²`` per sequence forward (QKᵀ and AV), scaled the same way.
MFU counts model FLOPs only (no recomputation), as in the PaLM paper; recomputation makes it HFU.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment; first match wins, so
# the more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
    ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A10", 125.0),
)


@dataclass(frozen=True)
class ModuleCost:
    """One module's share of a step."""

    num_weights: int
    num_tokens: int
    trains: bool
    gradient_passes: bool = False
    recomputed: bool = False
    attention_flops: float = 0.0  # forward attention-score FLOPs for its sequences

    def flops(self) -> float:
        forward = 2.0 * self.num_weights * self.num_tokens + self.attention_flops
        if self.trains:
            backward = 2.0 * forward
        elif self.gradient_passes:
            backward = forward
        else:
            return forward
        return forward + backward + (forward if self.recomputed else 0.0)


def attention_flops(num_layers: int, hidden: int, sequence_lengths) -> float:
    """Forward FLOPs of attention scores and their weighted sum over the given sequences."""
    return float(sum(4 * num_layers * hidden * length * length for length in sequence_lengths))


def step_flops(costs) -> float:
    """Sum of :meth:`ModuleCost.flops` over a step's modules."""
    return sum(cost.flops() for cost in costs)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by name, or None when unknown."""
    for fragment, tflops in PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            return tflops * 1e12
    return None


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int, device_name: str) -> float | None:
    """Achieved / peak FLOP/s over all devices, or None for an unknown device."""
    peak = peak_flops(device_name)
    if peak is None or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / (peak * num_devices)
