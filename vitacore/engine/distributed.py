"""Process-group set-up for one process, ``torchrun`` or the ``deepspeed`` launcher."""

from __future__ import annotations

import atexit
import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch

from vitacore import ranks


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _destroy_process_group() -> None:
    """Let every rank finish its queued communication, then tear the group down together.

    A rank that destroys its group (or reaches interpreter shutdown) while a peer still talks to it,
    or with asynchronous work still queued, can abort in gloo's threads after a successful run.
    After an error (:func:`vitacore.ranks.has_failed`) there is no barrier: a peer may never reach it
    (it failed elsewhere, or is still waiting in a collective this rank left), and waiting for it
    would only delay the exit that tells the launcher the job failed.
    """
    if not torch.distributed.is_initialized():
        return
    try:
        if torch.distributed.get_world_size() > 1 and not ranks.has_failed():
            if torch.distributed.get_backend() == "gloo":
                # Bounded: a peer that died must not keep this rank from exiting.
                torch.distributed.monitored_barrier(timeout=timedelta(seconds=60))
            else:
                torch.distributed.barrier()
    except RuntimeError:
        pass  # a peer is gone; tear down anyway
    torch.distributed.destroy_process_group()


def _deepspeed_groups_take_timeout(timeout: timedelta) -> None:
    """Make the process groups DeepSpeed creates wait at most ``timeout`` too.

    DeepSpeed's comm backend creates its groups with ``torch.distributed.new_group(ranks)``, and torch
    gives a group made without a timeout its own default (30 minutes), not the world group's. ZeRO's
    gradient and parameter collectives run on such a group (``groups._clone_world_group``): without
    this, a stalled peer kept the others waiting 30 minutes whatever ``--ddp_timeout`` said.
    """
    from deepspeed.comm import comm

    backend = comm.cdb
    if backend is not None and getattr(backend, "name", None) == "torch":
        backend.new_group = lambda ranks: torch.distributed.new_group(ranks, timeout=timeout)


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Initialize ``torch.distributed`` through DeepSpeed (gloo on CPU, NCCL on GPU).

    A plain ``python script.py`` has no launcher variables; DeepSpeed would then try MPI discovery,
    so a one-process group on a free loopback port is described in the environment first.

    Args:
        timeout_s: how long a collective waits for its peers before it raises (``--ddp_timeout``); it
            applies to the world group and to the groups DeepSpeed creates later. Ignored when the
            process group already exists.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    import deepspeed

    # DeepSpeed still calls the old collective names; the warnings say nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor).*")
    use_cuda = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", timeout=timeout)
        _deepspeed_groups_take_timeout(timeout)
        # Tear the group down before the interpreter does: communication threads left to static
        # destructors can abort a finished rank ("terminate called without an active exception").
        atexit.register(_destroy_process_group)
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)
