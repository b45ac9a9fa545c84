"""Under ZeRO-3, frozen encoders and adapters stay whole on every rank, outside what DeepSpeed manages.

ZeRO-3 partitions every parameter of the module handed to ``deepspeed.initialize`` and hooks every
submodule. For a part that is read but never stepped (a frozen vision tower, audio encoder, adapter),
that saves memory (each rank holds 1/N of it) and costs, on every step:

- a parameter gather (a collective) each time the part runs, so with several ranks a micro-batch
  without images still runs the tower on a dummy input (every rank must take part in the gather);
- DeepSpeed's re-gather of the part's small "persistent" parameters after each optimizer step,
  one collective per tensor (every bias and norm weight), although they never change;
- a ZeRO-3 hook call before and after each of its submodules.

Kept whole instead, such a part needs no collective: a rank without images does not run the tower
at all (:mod:`vitacore.model.encoder_sync` skips an encoder that needs neither a gather nor a
gradient). The price is memory: every rank holds the whole frozen part (InternViT-300M or
Whisper-medium's encoder: about 0.6 GB each in bf16). ``--zero3_frozen_parts partitioned`` keeps
them partitioned (a frozen tower of several GB on small GPUs).

The LLM is always partitioned, frozen or not (it is most of the model), and so is every part with
a trainable parameter (its gradients are reduce-scattered by ZeRO-3).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from vitacore.constants import ZERO3_FROZEN_PART_MODES
from vitacore.model.loading import is_zero3
from vitacore.partition import gathered, is_partitioned

NEVER_HELD_OUT = ("llm",)


class Zero3View(nn.Module):
    """The module a ZeRO-3 engine manages: the model's parts but the held-out ones, under their own names.

    Its children are the model's own modules (not copies), so parameter names, DeepSpeed checkpoint
    keys and optimizer groups are those of the model itself; ``forward`` and ``generate`` are the model's,
    and so is ``train`` (which reaches the held-out parts too). ``whole_model`` is the full model (exports,
    generation).
    """

    def __init__(self, model: nn.Module, held_out: tuple[str, ...]):
        super().__init__()
        self.__dict__["whole_model"] = model  # not registered: DeepSpeed must not see the held-out parts
        self.held_out = held_out
        for name, child in model.named_children():
            if name not in held_out:
                self.add_module(name, child)
        assert not list(model.named_parameters(recurse=False)), "the view assumes parameters live in parts"

    @property
    def config(self):
        """The model's config (DeepSpeed reads ``hidden_size`` from it for "auto" values)."""
        return self.whole_model.config

    def forward(self, *args, **kwargs):
        return self.whole_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The model's ``generate`` (evaluation answers through the engine's module)."""
        return self.whole_model.generate(*args, **kwargs)

    def train(self, mode: bool = True) -> "Zero3View":
        self.training = mode
        self.whole_model.train(mode)
        return self


def frozen_parts(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's freeze units (``unit_modules``) other than the LLM with no trainable parameter."""
    units = model.unit_modules() if hasattr(model, "unit_modules") else {}
    return tuple(name for name, module in units.items()
                 if name not in NEVER_HELD_OUT and not any(p.requires_grad for p in module.parameters()))


def module_for_engine(model: nn.Module, deepspeed_config: Optional[dict], frozen_part_mode: str = "whole"
                      ) -> nn.Module:
    """The module to hand to ``deepspeed.initialize``: ``model`` itself, or under ZeRO-3 a
    :class:`Zero3View` without its frozen parts, which are made whole again on every rank first.

    Call it on every rank, after the freeze policy and before ``deepspeed.initialize`` (gathering a
    part built partitioned is a collective).

    Args:
        model: a ``VitaModel`` (any other module is returned as it is).
        deepspeed_config: the complete DeepSpeed config (only its ZeRO stage matters).
        frozen_part_mode: ``--zero3_frozen_parts``: "whole" holds frozen parts out, "partitioned"
            leaves them to ZeRO-3.

    Raises:
        ValueError: an unknown ``frozen_part_mode``.
    """
    if frozen_part_mode not in ZERO3_FROZEN_PART_MODES:
        raise ValueError(f"--zero3_frozen_parts {frozen_part_mode!r}: choose one of "
                         f"{', '.join(ZERO3_FROZEN_PART_MODES)}")
    if not is_zero3(deepspeed_config) or frozen_part_mode == "partitioned":
        return model
    held_out = frozen_parts(model)
    if not held_out:
        return model
    units = model.unit_modules()
    for name in held_out:
        _make_whole(units[name])
    return Zero3View(model, held_out)


def _make_whole(module: nn.Module) -> None:
    """Replace every ZeRO-3-partitioned parameter of ``module`` by a plain frozen one holding the whole tensor
    (a collective: one gather per submodule); a parameter shared by two submodules stays shared."""
    whole: dict[int, nn.Parameter] = {}
    for submodule in module.modules():
        own = [(name, p) for name, p in submodule._parameters.items() if p is not None and is_partitioned(p)]
        fresh = [p for _, p in own if id(p) not in whole]
        if fresh:
            with gathered(fresh):
                for param in fresh:
                    whole[id(param)] = nn.Parameter(param.data.detach().clone(), requires_grad=False)
        for name, param in own:
            submodule._parameters[name] = whole[id(param)]
