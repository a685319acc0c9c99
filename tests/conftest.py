"""Shared test set-up. Helper modules (helpers, refmath, tiny_artifact) import by name: pyproject's
``pythonpath = ["tests"]``. Nothing here imports PyTorch, so the runtime's tests also run where
only the runtime is installed (``make test-runtime``)."""

import sys

import pytest


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test that uses PyTorch starts from the same random state."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(0)
    yield
