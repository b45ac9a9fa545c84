"""Shared test set-up: a private cache for the embedded default, DeepSpeed on CPU, vitacore's log."""

import logging
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

    ``VITACORE_TEST_CACHE`` reuses a folder across sessions (handy locally; CI builds fresh). Under
    ``pytest -n N`` the workers share one folder of the run's base temporary directory.
    """
    path = os.environ.get("VITACORE_TEST_CACHE")
    if not path and os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest -n: one cache for all workers (the build is safe across processes), not one build each.
        path = str(tmp_path_factory.getbasetemp().parent / "vitacore_cache")
    path = path or str(tmp_path_factory.mktemp("vitacore_cache"))
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


class VitacoreLog:
    """What the "vitacore" logger said during a test (through pytest's ``caplog``)."""

    def __init__(self, caplog):
        self.caplog = caplog

    @property
    def lines(self) -> list[str]:
        """The messages, oldest first."""
        return [r.getMessage() for r in self.caplog.records if r.name.split(".")[0] == "vitacore"]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def clear(self) -> None:
        self.caplog.clear()


_LOGGER = logging.getLogger("vitacore")
_PRISTINE_LOGGER = (_LOGGER.level, _LOGGER.propagate, list(_LOGGER.handlers))  # before any test ran


def _reset_vitacore_logger() -> None:
    _LOGGER.setLevel(_PRISTINE_LOGGER[0])
    _LOGGER.propagate = _PRISTINE_LOGGER[1]
    _LOGGER.handlers[:] = _PRISTINE_LOGGER[2]


@pytest.fixture(autouse=True)
def _restore_vitacore_logger():
    """Give each test the "vitacore" logger as the session found it, and put it back after: an entry
    point (``recipe_main``) calls ``enable_console()``, which adds a console handler and turns
    propagation off; a module-scoped fixture that runs one does so before this fixture starts."""
    _reset_vitacore_logger()
    yield
    _reset_vitacore_logger()


@pytest.fixture
def vitacore_log(caplog):
    """The "vitacore" logger's messages at INFO and above, as :class:`VitacoreLog`.

    ``caplog``'s handler sits on the logger itself and propagation is off during the test, so each
    record is caught exactly once, also when the test runs an entry point that calls
    ``enable_console()`` (which turns propagation off).
    """
    logger = logging.getLogger("vitacore")
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield VitacoreLog(caplog)  # _restore_vitacore_logger puts level, propagation and handlers back
