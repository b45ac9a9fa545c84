"""Fixtures for the engine tests: one gloo process group shared by every Trainer in the session."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def dist():
    """A one-process gloo group (``init_distributed`` describes it in the environment itself)."""
    from vitacore.engine import init_distributed

    info = init_distributed()
    assert info.world_size == 1 and info.rank == 0
    return info
