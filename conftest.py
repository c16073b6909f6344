"""Repository-wide pytest hooks: ``@pytest.mark.gpu`` tests skip where CUDA is absent (CI never has one)."""

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
