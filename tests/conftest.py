import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # test helpers such as refmath


@pytest.fixture(autouse=True)
def _deterministic_threads():
    import torch

    torch.manual_seed(0)
    yield
