"""``dvml synth``: a generated feature world that follows DVML's own generative assumption.

What it models (section 3.2 of the paper): every image's latent is a **class centre** plus an
**intra-class variation** drawn from one class-independent distribution (think pose, viewpoint,
lighting: the same kinds of change for every class). Concretely, for image i of class k::

    c_k ~ N(0, I_class_dim)                                    class centre (intra-class invariance)
    v_i ~ N(0, I_variation_dim)                                image's variation (class-independent)
    view j of image i:  v_ij = v_i                  (j = 0, the "centre crop")
                        v_ij = F^f (v_i + s_view·e) (j >= 1: jitter e ~ N(0, I); f ~ Bernoulli(1/2)
                                                     applies a fixed class-independent reflection F,
                                                     the "horizontal flip")
    h_ij = [c_k / √class_dim, variation_strength · v_ij / √variation_dim]   latent (both parts unit norm)
    x_ij = relu(W2 · tanh(W1 · h_ij + b1) + b2) · exp(g_i)     D non-negative "pooled features"

with one fixed random nonlinear map (W1, b1, W2, b2) shared by all classes and a per-image global gain
g_i ~ N(0, 0.15²) ("illumination"). Classes ``0 .. n_classes/2 - 1`` are the training split and the rest
the test split (zero-shot, like CUB's 100/100). Training images carry ``views`` views (view 0 is the
deterministic centre view), test images ``test_views`` (centre, then the flipped centre).

Why it is a useful test bed: with ``variation_strength`` > 1 the variation dominates raw-feature
distances, so raw features retrieve poorly (nearest neighbours share a pose rather than a class); and
``class_dim`` is larger than the number of training classes, so a learned embedding can fit the
subspace spanned by the training centres and overfit them, which is the generalisation gap DVML targets.

Limits: it is not images. Real pooled CNN features have heavy-tailed, correlated activations, class
structure that is not a Gaussian blob, and variation that is not exactly class-independent; numbers on
synth worlds say whether the machinery works and how methods rank *under DVML's own assumption*, not
how they rank on CUB. Everything is numpy with one seeded ``numpy.random.Generator``: the same
parameters and seed always give the same file (the same fingerprint).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dvml.cache import schema as S
from dvml.cache.writer import CacheSpec, CacheWriter

log = logging.getLogger(__name__)

# largest variation_strength, view_jitter and nonlinearity: far past any useful world, and small enough that the
# latents and the map stay finite in float64 (1e300 would overflow them into a cache of NaN)
MAX_SCALE = 1e6


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of a generated feature world. Defaults are CUB-sized (200 classes x ~60 images)."""

    n_classes: int = 200
    images_per_class: int = 60
    views: int = 10
    test_views: int = 1
    feature_dim: int = 1024
    class_dim: int = 512
    variation_dim: int = 16
    variation_strength: float = 2.5
    view_jitter: float = 0.3
    hidden_dim: int = 512
    nonlinearity: float = 6.0
    seed: int = 0
    dtype: str = "float16"

    def __post_init__(self):
        """Refuse parameters that cannot make a usable world. Each message starts with the field it names
        (``dvml synth`` rewrites them as its options, :data:`dvml.cli.synth.FIELD_OPTIONS`)."""
        if self.n_classes < 4 or self.n_classes % 2:
            raise ValueError(f"n_classes must be an even number >= 4, got {self.n_classes}")
        if self.images_per_class < 2:
            raise ValueError(f"images_per_class must be >= 2 (retrieval needs a positive), "
                             f"got {self.images_per_class}")
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if self.test_views not in (1, 2):
            raise ValueError(f"test_views must be 1 or 2, got {self.test_views}")
        for name in ("feature_dim", "class_dim", "variation_dim", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("variation_strength", "view_jitter"):  # written so that NaN fails too
            if not 0 <= getattr(self, name) <= MAX_SCALE:
                raise ValueError(f"{name} must be a finite number in [0, {MAX_SCALE:g}], got {getattr(self, name)}")
        if not 0 < self.nonlinearity <= MAX_SCALE:
            raise ValueError(f"nonlinearity must be a finite number in (0, {MAX_SCALE:g}], got {self.nonlinearity}")
        if self.dtype not in S.FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {S.FEATURE_DTYPES}, got {self.dtype!r}")


class _World:
    """The fixed random parts of a world: centres, map, reflection. Drawn in a fixed order."""

    def __init__(self, cfg: SynthConfig):
        rng = np.random.default_rng(cfg.seed)
        latent = cfg.class_dim + cfg.variation_dim
        self.centres = rng.standard_normal((cfg.n_classes, cfg.class_dim))
        # pre-activations ~ N(0, 1.5^2) whatever the strength: the tanh is used, not saturated
        self.w1 = rng.standard_normal((latent, cfg.hidden_dim)) * cfg.nonlinearity / np.sqrt(
            1 + cfg.variation_strength**2)
        self.b1 = rng.standard_normal(cfg.hidden_dim) * 0.1
        self.w2 = rng.standard_normal((cfg.hidden_dim, cfg.feature_dim)) / np.sqrt(cfg.hidden_dim)
        self.b2 = np.full(cfg.feature_dim, 0.2)  # a little over half the units fire, like pooled ReLUs
        q, _ = np.linalg.qr(rng.standard_normal((cfg.variation_dim, cfg.variation_dim)))
        d = np.ones(cfg.variation_dim)
        d[: max(1, cfg.variation_dim // 4)] = -1.0  # a reflection of a quarter of the variation axes
        self.flip = (q * d) @ q.T  # symmetric orthogonal, flip @ flip = I
        self.cfg = cfg

    def features(self, cls: int, variation: np.ndarray, gain: np.ndarray) -> np.ndarray:
        """variation: (B, V, variation_dim), gain: (B,) -> (B, V, D) float32 non-negative."""
        cfg = self.cfg
        b, v, _ = variation.shape
        # both parts have unit expected norm, so variation_strength is the ratio of their norms
        c = np.broadcast_to(self.centres[cls] / np.sqrt(cfg.class_dim), (b, v, cfg.class_dim))
        h = np.concatenate([c, variation * (cfg.variation_strength / np.sqrt(cfg.variation_dim))], axis=-1)
        x = np.maximum(np.tanh(h @ self.w1 + self.b1) @ self.w2 + self.b2, 0.0)
        return (x * np.exp(gain)[:, None, None]).astype(np.float32)


def _class_views(world: _World, rng: np.random.Generator, cls: int, n_views: int,
                 train: bool) -> np.ndarray:
    cfg = world.cfg
    n = cfg.images_per_class
    v = rng.standard_normal((n, cfg.variation_dim))
    gain = rng.standard_normal(n) * 0.15
    views = np.empty((n, n_views, cfg.variation_dim))
    views[:, 0] = v
    if train:
        for j in range(1, n_views):
            jittered = v + cfg.view_jitter * rng.standard_normal(v.shape)
            flipped = rng.random(n) < 0.5
            jittered[flipped] = jittered[flipped] @ world.flip
            views[:, j] = jittered
    elif n_views == 2:
        views[:, 1] = v @ world.flip
    return world.features(cls, views, gain)


def generate(cfg: SynthConfig, out: str | Path, *, overwrite: bool = False,
             progress: Callable[[int], None] | None = None) -> Path:
    """Write the world to ``out`` (a complete cache file) and return its path.

    ``progress`` is called with the number of classes just written (for a progress bar).
    Class k's images come from its own seeded stream, so the output does not depend on chunking.
    """
    world = _World(cfg)
    half = cfg.n_classes // 2
    spec = CacheSpec(dataset="synth", backbone="synthetic-nonlinear-map", weights="none",
                     feature_dim=cfg.feature_dim,
                     views=("centre",) + tuple(f"jitter+flip(seed={cfg.seed},view={j})"
                                               for j in range(1, cfg.views)),
                     test_views=cfg.test_views, dtype=cfg.dtype, extra={"synth": asdict(cfg)})
    with CacheWriter(out, spec, overwrite=overwrite) as writer:
        for split, classes in ((S.TRAIN, range(half)), (S.TEST, range(half, cfg.n_classes))):
            done_classes = writer.n_written(split) // cfg.images_per_class
            for cls in classes[done_classes:]:
                rng = np.random.default_rng([cfg.seed, 1, cls])
                n_views = cfg.views if split == S.TRAIN else cfg.test_views
                feats = _class_views(world, rng, cls, n_views, train=split == S.TRAIN)
                writer.append(split, feats, np.full(cfg.images_per_class, cls, dtype=np.int64))
                if progress is not None:
                    progress(1)
        path = writer.finalize()
    log.info("wrote synth world %s (%d classes, %d images/class)", path, cfg.n_classes, cfg.images_per_class)
    return path
