"""Seeded class-balanced batches: every batch holds ``per_class`` images of each of ``batch_size / per_class``
distinct classes.

One epoch is ``N // batch_size`` batches (about one pass over the images). Each batch draws its classes
uniformly without replacement among the eligible classes, and for each class ``per_class`` of its images
without replacement. A class with fewer images than that repeats them, and then never the same (image, view):

* ``views=None`` (images augmented afresh at every draw, ``dvml finetune``): eligible = at least two images; a
  small class's images wrap around (each occurrence gets its own random augmentation).
* ``views=P`` (a feature cache with P views per image, ``fit-heads``): eligible = at least two images and
  ``count · P ≥ per_class``; :meth:`ClassBalancedSampler.epoch_with_ranks` also returns, per slot, how many
  earlier slots of the batch hold the same image (its *rank* r), and the trainer takes view
  ``(v_image + r) mod P`` — distinct views of a repeated image, never the same image and view twice (with one
  view, a class needs ``per_class`` images). Ineligible classes are never drawn (a warning counts them).

All draws for an epoch are made at once from the given ``torch.Generator`` (no python loop over batches or
samples), so the same generator state gives the same epoch.
"""

from __future__ import annotations

import logging

from dvml._lazy import lazy_module
from dvml.errors import DvmlError

torch = lazy_module("torch")  # imported on first draw: the batch-size rule (heads.batch) needs none of it

log = logging.getLogger(__name__)


def drawable(counts, per_class: int, views: int | None):
    """Which classes a batch may draw (the one rule, shared with :mod:`dvml.heads.batch`): at least two images
    and, with ``views`` given, at least ``per_class`` distinct (image, view) pairs. ``counts``: images per class
    (numpy or torch array) → a boolean array of the same shape."""
    ok = counts >= 2
    if views is not None:
        ok = ok & (counts * views >= per_class)
    return ok


class ClassBalancedSampler:
    """Batches of indices into the training set.

    Args:
        labels: (N,) int64 class ids.
        batch_size: images per batch (a multiple of ``per_class``).
        per_class: images per class in a batch (m).
        generator: CPU ``torch.Generator`` driving every draw.
        views: P, views per image in the cache (see the module docstring); ``None`` = images are augmented at
            every draw.
    Raises:
        DvmlError: fewer eligible classes than classes per batch.
    """

    def __init__(self, labels: torch.Tensor, batch_size: int, per_class: int, generator: torch.Generator,
                 views: int | None = None):
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if batch_size % per_class:
            raise ValueError(f"batch_size {batch_size} is not a multiple of per_class {per_class}")
        self.batch_size, self.per_class, self.generator = batch_size, per_class, generator
        self.k = batch_size // per_class
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if views is not None and views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.views = views
        single = counts < 2
        if bool(single.any()):
            log.warning("%d training class(es) have a single image and are never sampled", int(single.sum()))
        keep = drawable(counts, per_class, views)
        few = keep.logical_not() & ~single
        if bool(few.any()):
            log.warning("%d training class(es) have fewer than %d distinct (image, view) pairs (%d view(s) per "
                        "image) and are never sampled; lower --per-class to use them", int(few.sum()), per_class,
                        views)
        need = "2 images" if views is None else f"2 images and {per_class} distinct (image, view) pairs"
        if int(keep.sum()) < self.k:
            raise DvmlError(f"a batch of {batch_size} with {per_class} images per class needs {self.k} training "
                            f"classes with >= {need}, but there are {int(keep.sum())}: lower `batch_size` "
                            "or `per_class`")
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
        return self.epoch_with_ranks()[0]

    def epoch_with_ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch: ``(indices, ranks)``, both (n_batches, batch_size) int64.

        ``indices`` as :meth:`epoch`; ``ranks[b, s]`` = how many earlier slots of batch b hold the same image
        (0 unless its class has fewer than ``per_class`` images): the view offset that keeps (image, view) pairs
        distinct (see the module docstring).
        """
        g, nb, k, m = self.generator, self.n_batches, self.k, self.per_class
        n_classes, max_n = self.members.shape
        cls = torch.rand((nb, n_classes), generator=g).topk(k, dim=1).indices  # (nb, k) distinct classes
        keys = torch.rand((nb, k, max_n), generator=g)
        keys = keys.masked_fill(self.members[cls] < 0, 2.0)  # padding sorts last
        perm = keys.argsort(dim=-1)  # random order of each class's images
        slot = torch.arange(m)[None, None, :]
        count = self.counts[cls][..., None]
        picked = perm.gather(-1, slot % count)  # (nb, k, m) positions within the class; wrap for < m images
        ranks = (slot // count).reshape(nb, k * m)  # the r-th repetition of an image
        return self.members[cls[..., None], picked].reshape(nb, k * m), ranks
