"""Shared test set-up: a private cache for the embedded default, DeepSpeed on CPU."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def dist():
    """A one-process gloo group shared by every Trainer in the session (real DeepSpeed, CPU)."""
    from vitacore.engine import init_distributed

    info = init_distributed()
    assert info.world_size == 1 and info.rank == 0
    return info


@pytest.fixture(scope="session")
def vitacore_cache(tmp_path_factory):
    """A cache folder for the embedded default, shared by the tests of one session.

    ``VITACORE_TEST_CACHE`` reuses a folder across sessions (handy locally; CI builds fresh).
    """
    path = os.environ.get("VITACORE_TEST_CACHE") or str(tmp_path_factory.mktemp("vitacore_cache"))
    os.environ["VITACORE_CACHE"] = path
    return path


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests on machines without CUDA (the CPU suite still covers their logic)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
