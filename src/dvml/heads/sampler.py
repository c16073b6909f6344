"""Seeded class-balanced batches: every batch holds ``per_class`` images of each of ``batch_size / per_class``
distinct classes.

One epoch is ``N // batch_size`` batches (about one pass over the images). Each batch draws its classes
uniformly without replacement among the classes with at least two images, and for each class ``per_class``
of its images without replacement (with wrap-around repetition for a class with fewer images than that).
All draws for an epoch are made at once from the given ``torch.Generator`` (no python loop over batches or
samples), so the same generator state gives the same epoch.
"""

from __future__ import annotations

import logging

import torch

from dvml.errors import DvmlError

log = logging.getLogger(__name__)


class ClassBalancedSampler:
    """Batches of indices into the training set.

    Args:
        labels: (N,) int64 class ids.
        batch_size: images per batch (a multiple of ``per_class``).
        per_class: images per class in a batch (m).
        generator: CPU ``torch.Generator`` driving every draw.
    Raises:
        DvmlError: fewer eligible classes (≥ 2 images) than classes per batch.
    """

    def __init__(self, labels: torch.Tensor, batch_size: int, per_class: int, generator: torch.Generator):
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if batch_size % per_class:
            raise ValueError(f"batch_size {batch_size} is not a multiple of per_class {per_class}")
        self.batch_size, self.per_class, self.generator = batch_size, per_class, generator
        self.k = batch_size // per_class
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        keep = counts >= 2
        if not bool(keep.all()):
            log.warning("%d training class(es) have a single image and are never sampled", int((~keep).sum()))
        if int(keep.sum()) < self.k:
            raise DvmlError(f"a batch of {batch_size} with {per_class} images per class needs {self.k} training "
                            f"classes with >= 2 images, but there are {int(keep.sum())}: lower --batch-size "
                            "or raise --per-class")
        order = torch.argsort(inverse, stable=True)  # image indices grouped by class
        starts = torch.cumsum(counts, 0) - counts
        max_n = int(counts.max())
        pos = torch.arange(max_n)
        members = torch.full((len(classes), max_n), -1, dtype=torch.int64)
        valid = pos[None, :] < counts[:, None]
        members[valid] = order[(starts[:, None] + pos[None, :])[valid]]
        self.members = members[keep]  # (C', max_n), -1 padded
        self.counts = counts[keep]  # (C',)
        self.n_batches = max(1, len(labels) // batch_size)

    def __len__(self) -> int:
        return self.n_batches

    def epoch(self) -> torch.Tensor:
        """(n_batches, batch_size) int64 image indices for one epoch; classes in contiguous runs of m."""
        g, nb, k, m = self.generator, self.n_batches, self.k, self.per_class
        n_classes, max_n = self.members.shape
        cls = torch.rand((nb, n_classes), generator=g).topk(k, dim=1).indices  # (nb, k) distinct classes
        keys = torch.rand((nb, k, max_n), generator=g)
        keys = keys.masked_fill(self.members[cls] < 0, 2.0)  # padding sorts last
        perm = keys.argsort(dim=-1)  # random order of each class's images
        j = torch.arange(m)[None, None, :] % self.counts[cls][..., None]  # wrap for classes with < m images
        picked = perm.gather(-1, j)  # (nb, k, m) positions within the class
        return self.members[cls[..., None], picked].reshape(nb, k * m)
