"""Shared fixtures for the heads tests: tiny seeded synth worlds written as real cache files."""

from __future__ import annotations

import pytest
import torch

from dvml.extract.synth import SynthConfig, generate


@pytest.fixture(autouse=True)
def _few_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and contention on shared cores)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """12 train + 12 test classes x 10 images, 3 train views, D = 64 (fast)."""
    path = tmp_path_factory.mktemp("synth") / "tiny.h5"
    return generate(SynthConfig(n_classes=24, images_per_class=10, views=3, feature_dim=64, class_dim=32,
                                variation_dim=8, hidden_dim=64, seed=3), path)


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    """40 + 40 classes x 16 images, 3 views, D = 128: big enough that learning shows in test Recall@1."""
    path = tmp_path_factory.mktemp("synth") / "small.h5"
    return generate(SynthConfig(n_classes=80, images_per_class=16, views=3, feature_dim=128, class_dim=64,
                                variation_dim=8, hidden_dim=128, seed=5), path)
