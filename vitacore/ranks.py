"""Ranks fail together: rank-local work that can fail is followed by an agreement on whether it did.

Without it, one rank that raises (a corrupt shard it alone reads, a bad record it alone draws, a
disk error in its part of a save) leaves its peers waiting in the next collective until the
process-group timeout. Wrapping that work in :func:`together` makes every rank learn, at the end of
the block, whether any rank failed, and raise with the failing rank's own message.

Works without a process group (one process, tools, tests): then it only runs the block.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

_failed = False


class PeerRankError(ValueError):
    """Another rank failed in work this rank finished (the message is that rank's own)."""


def world_size() -> int:
    """Processes in the job (1 without a process group)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def this_rank() -> int:
    """This process's rank (0 without a process group)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def mark_failed() -> None:
    """Record that this process is ending in an error: its exit must not wait for peers in a barrier."""
    global _failed
    _failed = True


def has_failed() -> bool:
    """True once :func:`mark_failed` ran (or a :func:`together` block failed here or on a peer)."""
    return _failed


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {text}"


def agree(error: Optional[BaseException], what: str) -> None:
    """Every rank calls this at the same point with its own outcome (None: it succeeded).

    Raises:
        the rank's own ``error`` when it has one; otherwise :class:`PeerRankError` with the first
        failing rank's message when another rank failed. Nothing when every rank succeeded.
    """
    size = world_size()
    if size == 1:
        if error is not None:
            mark_failed()
            raise error
        return
    flag = torch.tensor([1.0 if error is not None else 0.0],
                        device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(flag)
    if not flag.item():
        return
    messages: list = [None] * size
    torch.distributed.all_gather_object(messages, None if error is None else _describe(error))
    mark_failed()
    if error is not None:
        raise error
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise PeerRankError(f"rank {rank} failed while {what}: {message}")


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
    """Run a block whose failure on one rank must stop every rank (every rank enters it).

    Args:
        what: the work, for the peers' message (``"reading checkpoint-4"``).

    Raises:
        the block's own exception on the rank where it happened, :class:`PeerRankError` on the others.
    """
    error: Optional[BaseException] = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - handed to every rank, then re-raised
        error = err
    agree(error, what)


def broadcast_from_main(value):
    """Rank 0's ``value`` on every rank (a picklable object; the value itself without a process group)."""
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_all(value) -> list:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` without a process group)."""
    size = world_size()
    if size == 1:
        return [value]
    values: list = [None] * size
    torch.distributed.all_gather_object(values, value)
    return values
