"""``dvml.extract.synth``: determinism, contract compliance, and the difficulty it promises."""

from __future__ import annotations

import numpy as np
import pytest

from dvml.cache import fingerprint, load_split, read_info
from dvml.extract.synth import SynthConfig, generate


def brute_force_recall_at_1(x: np.ndarray, y: np.ndarray) -> float:
    """Cosine nearest neighbour by a full similarity matrix, query excluded."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return float((y[sim.argmax(1)] == y).mean())


def test_deterministic_for_a_seed(tmp_path):
    cfg = SynthConfig(n_classes=8, images_per_class=5, views=3, feature_dim=64)
    a = generate(cfg, tmp_path / "a.h5")
    b = generate(cfg, tmp_path / "b.h5")
    c = generate(SynthConfig(n_classes=8, images_per_class=5, views=3, feature_dim=64, seed=1), tmp_path / "c.h5")
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_follows_the_cache_contract(tmp_path):
    cfg = SynthConfig(n_classes=10, images_per_class=4, views=5, test_views=2, feature_dim=32)
    path = generate(cfg, tmp_path / "w.h5")
    info = read_info(path)
    assert (info.splits["train"].n, info.splits["train"].views) == (20, 5)
    assert (info.splits["test"].n, info.splits["test"].views) == (20, 2)
    tr, te = load_split(path, "train"), load_split(path, "test")
    assert set(tr.labels) == set(range(5)) and set(te.labels) == set(range(5, 10))
    assert (tr.features >= 0).all() and (te.features >= 0).all()
    assert info.extra["synth"]["seed"] == 0
    # view 0 is the deterministic centre view: test images' view 1 is the flip of view 0, not a copy
    assert not np.allclose(te.features[:, 0], te.features[:, 1])
    # training views are augmentations of one image: closer to their own centre view than to other images'
    own = np.linalg.norm(tr.features[:, 1] - tr.features[:, 0], axis=1).mean()
    other = np.linalg.norm(tr.features[:, 1] - np.roll(tr.features[:, 0], 1, axis=0), axis=1).mean()
    assert own < other


def test_raw_features_retrieve_poorly_but_not_at_chance(tmp_path):
    cfg = SynthConfig(n_classes=60, images_per_class=20, views=1)
    path = generate(cfg, tmp_path / "w.h5")
    te = load_split(path, "test")
    r1 = brute_force_recall_at_1(te.features[:, 0], te.labels)
    chance = (cfg.images_per_class - 1) / (len(te.labels) - 1)
    assert r1 < 0.5, f"raw Recall@1 {r1:.3f} is too easy for a metric-learning test bed"
    assert r1 > 3 * chance, f"raw Recall@1 {r1:.3f} carries no class signal (chance {chance:.3f})"


def test_rejects_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="even number"):
        SynthConfig(n_classes=5)
    with pytest.raises(ValueError, match="images_per_class"):
        SynthConfig(images_per_class=1)


@pytest.mark.parametrize("field", ["variation_strength", "view_jitter", "nonlinearity"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e300])
def test_rejects_non_finite_and_overflowing_scales(field, value):
    # NaN passes every comparison and 1e300 overflows the latents: both once wrote a complete cache of NaN
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        SynthConfig(**{field: value})
