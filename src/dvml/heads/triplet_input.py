"""The paper's "triplet input" (section 3.5: "batch size ... 120 for the triplet input"): batches of K explicit
triplets (anchor, positive, negative), laid out as ``[anchors (K); positives (K); negatives (K)]``.

Each triplet draws its anchor class uniformly among the classes with at least two images, two distinct images
of it (anchor, positive), a different class uniformly and one image of that class (negative). Triplets are drawn
independently (an image may appear in two triplets of a batch). One epoch is ``N // (3K)`` batches. All draws of
an epoch are made at once from the given ``torch.Generator``.
"""

from __future__ import annotations

import torch

from dvml.errors import DvmlError


class TripletInputSampler:
    """Batches of 3K indices into the training set: K anchors, then their K positives, then K negatives.

    Args:
        labels: (N,) int64 class ids.
        batch_size: 3K images per batch (the paper: 120 = 40 triplets).
        generator: CPU ``torch.Generator`` driving every draw.
    """

    def __init__(self, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if batch_size % 3:
            raise ValueError(f"the triplet input needs a batch size divisible by 3, got {batch_size}")
        self.k, self.batch_size, self.generator = batch_size // 3, batch_size, generator
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if int((counts >= 2).sum()) < 1 or len(classes) < 2:
            raise DvmlError("the triplet input needs a class with >= 2 images and a second class")
        order = torch.argsort(inverse, stable=True)
        self.starts = torch.cumsum(counts, 0) - counts  # (C,) first position of each class in ``order``
        self.order, self.counts = order, counts
        self.anchor_classes = torch.nonzero(counts >= 2).flatten()
        self.n_classes = len(classes)
        self.n_batches = max(1, len(labels) // batch_size)

    def __len__(self) -> int:
        return self.n_batches

    def epoch_with_ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`epoch` and (n_batches, 3K) zero view offsets (the trainer's interface shared with
        :class:`~dvml.heads.sampler.ClassBalancedSampler`): a triplet's anchor and positive are distinct images,
        and an image drawn into two triplets of a batch keeps its drawn view in both."""
        idx = self.epoch()
        return idx, torch.zeros_like(idx)

    def _member(self, cls: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.order[self.starts[cls] + pos]

    def epoch(self) -> torch.Tensor:
        """(n_batches, 3K) int64 image indices: per batch, K anchors, their K positives, K negatives."""
        g, nb, k = self.generator, self.n_batches, self.k
        ca = self.anchor_classes[torch.randint(len(self.anchor_classes), (nb, k), generator=g)]
        n_a = self.counts[ca]
        ia = (torch.rand((nb, k), generator=g) * n_a).long().clamp_max(n_a - 1)
        ip = (ia + 1 + (torch.rand((nb, k), generator=g) * (n_a - 1)).long().clamp_max(n_a - 2)) % n_a  # ≠ ia
        cn = (ca + 1 + torch.randint(self.n_classes - 1, (nb, k), generator=g)) % self.n_classes  # ≠ ca
        n_n = self.counts[cn]
        i_n = (torch.rand((nb, k), generator=g) * n_n).long().clamp_max(n_n - 1)
        return torch.cat([self._member(ca, ia), self._member(ca, ip), self._member(cn, i_n)], dim=1)
