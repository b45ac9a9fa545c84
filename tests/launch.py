"""What tests that start training processes share: a clean environment and a free port."""

from __future__ import annotations

import os
import socket

# A launcher's variables left in the test's own environment would make a child join the wrong job.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def env_for(cache: str) -> dict:
    """The environment of a child training process: the test's embedded-default cache, CPU DeepSpeed."""
    env = dict(os.environ, VITACORE_CACHE=cache, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    return env


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
