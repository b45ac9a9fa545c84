"""ZeRO-3 partitioned parameters: recognise them, and gather them for a read or a rank-0 write."""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a parameter DeepSpeed ZeRO-3 has partitioned (its data lives in shards)."""
    return hasattr(param, "ds_id")


def gathered(params: Iterable[torch.Tensor], modifier_rank: Optional[int] = None):
    """A context in which every partitioned tensor of ``params`` is whole; a no-op when none is.

    A collective: every rank must enter it. With ``modifier_rank=0``, what rank 0 writes inside is
    re-partitioned from rank 0's values on exit (loading weights); ``None`` gathers for reading.
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)
