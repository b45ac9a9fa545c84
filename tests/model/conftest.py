"""Fixtures over the shared tiny VitaModel builder (``tests/tiny_models.py``), and vitacore's log."""

import logging

import pytest
from tiny_models import TINY, build_tiny_vita


@pytest.fixture
def tiny_dims():
    """Sizes of the tiny parts (a copy, so a test cannot change them for others)."""
    return dict(TINY)


@pytest.fixture
def make_tiny_vita():
    """The builder itself, for tests that need other ``model_max_length`` / ``padding_side``."""
    return build_tiny_vita


@pytest.fixture
def tiny_vita():
    return build_tiny_vita()


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


@pytest.fixture
def vitacore_log(caplog):
    """The "vitacore" logger's messages at INFO and above, as :class:`VitacoreLog`.

    An entry point run earlier in the session (``enable_console()``) turns the logger's propagation
    off, which would hide its records from ``caplog``; it is turned on for the test and restored.
    """
    from vitacore.console import logger

    propagate = logger.propagate
    logger.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="vitacore"):
            yield VitacoreLog(caplog)
    finally:
        logger.propagate = propagate
