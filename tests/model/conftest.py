"""Fixtures over the shared tiny VitaModel builder (``tests/tiny_models.py``)."""

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
