"""Extract tests run the real GoogLeNet on tiny crops; one intra-op thread is fastest on a busy 2-core box
(OpenMP threads spin against other processes), so the tests pin it and restore it afterwards."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
