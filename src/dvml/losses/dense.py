"""Dense forms of the paper's three metric losses for many independent batches at once (the stacked trainer).

:mod:`dvml.losses.metric` computes a loss for the T batches of *one* fit; its index sets (which rows are anchors,
positives, negatives) come from the batch's labels through ``argsort`` / ``unique`` / ``nonzero``, whose shapes
depend on the data. Stacked fits (:mod:`dvml.heads.stacked`) hold M members, each with its own labels, so the
losses here take the batch's *layout* instead of its labels: a class-balanced batch of
:class:`~dvml.heads.sampler.ClassBalancedSampler` holds its ``B / m`` distinct classes in contiguous blocks of
``m`` rows, whatever the classes are. Under that layout every index set is the same for every member and every
draw, and each loss is a fixed-shape masked computation over a leading batch axis ``G`` (members × draws).

Each function returns one value per leading row, ``(G,)``: the loss of that batch exactly as
:class:`~dvml.losses.metric.BatchedTripletLoss` / :class:`~dvml.losses.metric.BatchedNPairLoss` define it for a
single batch (the same triplets, pairs and reducers; the row order inside a batch does not change the value). The
caller averages the T draws of a member. Tested against those classes (and so against pytorch-metric-learning)
on batches with shuffled class ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dvml.losses.metric import DWS_CUTOFF, DWS_NONZERO_LOSS_CUTOFF, NPAIR_L2_REG, block_triplet_violations
from dvml.losses.names import MetricReduction


def block_labels(b: int, m: int, device=None) -> torch.Tensor:
    """(B,) block ids of the layout: row i belongs to block i // m."""
    if b % m:
        raise ValueError(f"a batch of {b} rows is not made of blocks of {m}")
    return torch.arange(b, device=device) // m


def is_block_layout(labels: torch.Tensor, m: int) -> bool:
    """Whether every batch in ``labels`` (..., B) is ``B / m`` contiguous blocks of ``m`` equal labels with distinct
    labels across blocks (what the stacked losses assume)."""
    b = labels.shape[-1]
    if b % m:
        return False
    blocks = labels.reshape(*labels.shape[:-1], b // m, m)
    if not bool((blocks == blocks[..., :1]).all()):
        return False
    heads = blocks[..., 0]
    return bool((heads.sort(dim=-1).values.diff(dim=-1) != 0).all())


def _distances(z: torch.Tensor, squared: bool, anchors: torch.Tensor | None) -> torch.Tensor:
    """(G, B, E) → (G, B, B) euclidean distances of the L2-normalised rows, as ``metric._pair_distances``."""
    u = F.normalize(z, p=2, dim=-1)
    ua = u if anchors is None else F.normalize(anchors, p=2, dim=-1)
    d2 = (2.0 - 2.0 * torch.bmm(ua, u.transpose(1, 2))).clamp_min(0.0)
    return d2 if squared else d2.clamp_min(1e-12).sqrt()


def reduce_rows(v: torch.Tensor, reducer: MetricReduction | str, count: torch.Tensor | int | None = None
                ) -> torch.Tensor:
    """(G, K) per-triplet losses → (G,): the per-batch part of ``metric._reduce_triplets`` (before its mean over
    t): ``sum``, ``mean`` (over ``count`` real triplets, default K) or ``nonzero`` (mean of the positive ones)."""
    reducer = MetricReduction(reducer)
    if reducer is MetricReduction.sum:
        return v.sum(dim=1)
    if reducer is MetricReduction.mean:
        n = v.shape[1] if count is None else count
        if isinstance(n, torch.Tensor):
            n = n.clamp_min(1)
        return v.sum(dim=1) / n
    return v.sum(dim=1) / (v > 0).sum(dim=1).clamp_min(1)


def block_triplet(z: torch.Tensor, m: int, *, margin: float, squared: bool = True,
                  reducer: MetricReduction | str = MetricReduction.nonzero,
                  anchors: torch.Tensor | None = None) -> torch.Tensor:
    """Every triplet of each batch (paper eq. 2): z (G, B, E) in blocks of m → (G,).

    ``anchors`` (G, B, E): the cross pairs (each triplet's anchor from ``anchors``, positive and negative from z).
    """
    v, count = block_triplet_violations(_distances(z, squared, anchors), m, margin)
    return reduce_rows(v, reducer, count)


def block_npair(z: torch.Tensor, *, anchors: torch.Tensor | None = None, l2_reg: float = NPAIR_L2_REG
                ) -> torch.Tensor:
    """Multi-class N-pair loss (paper eq. 3) of each batch in blocks of 2: z (G, B, E) → (G,).

    Block c's first row is the anchor, its second the positive (``BatchedNPairLoss.pairs`` in batch order);
    cross-entropy of the (N, N) dot-product logits with the diagonal as targets, plus ``l2_reg`` · mean ‖z‖².
    """
    g, b, _ = z.shape
    if b % 2:
        raise ValueError(f"npair batches are pairs: {b} rows")
    za = z[:, 0::2] if anchors is None else anchors[:, 0::2]
    logits = torch.bmm(za, z[:, 1::2].transpose(1, 2))  # (G, N, N)
    n = logits.shape[1]
    target = torch.arange(n, device=z.device).repeat(g)
    ce = F.cross_entropy(logits.reshape(g * n, n), target, reduction="none").view(g, n).mean(dim=1)
    if l2_reg:
        ce = ce + l2_reg * z.square().sum(dim=-1).mean(dim=1)
    return ce


def dws_weights(d: torch.Tensor, m: int, embedding_dim: int, cutoff: float = DWS_CUTOFF,
                nonzero_loss_cutoff: float = DWS_NONZERO_LOSS_CUTOFF) -> torch.Tensor:
    """(G, B, B) non-squared distances in blocks of m → row-normalised distance-weighted sampling weights
    (``BatchedTripletLoss.dws_weights`` with the block layout as the labels)."""
    e = float(embedding_dim)
    dc = d.clamp_min(cutoff)
    log_w = (2.0 - e) * torch.log(dc) - ((e - 3.0) / 2.0) * torch.log((1.0 - 0.25 * dc.square()).clamp_min(1e-12))
    lab = block_labels(d.shape[-1], m, d.device)
    eligible = (lab[:, None] != lab[None, :]) & (d < nonzero_loss_cutoff) & torch.isfinite(log_w)
    log_w = log_w.masked_fill(~eligible, float("-inf"))
    row_max = log_w.amax(dim=-1, keepdim=True).clamp_min(-1e30)
    w = torch.exp(log_w - row_max)
    return w / w.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def block_pairs(b: int, m: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (anchor, positive) pairs of a batch in blocks of m, in ``torch.nonzero`` order (by anchor, then
    positive), and each positive's rank among its anchor's positives: ``(a, p, rank)``, each (K,)."""
    lab = block_labels(b, m, device)
    pos = (lab[:, None] == lab[None, :]) & ~torch.eye(b, dtype=torch.bool, device=device)
    a, p = torch.nonzero(pos, as_tuple=True)
    rank = (torch.cumsum(pos.long(), dim=1) - 1)[a, p]
    return a, p, rank


@torch.no_grad()
def dws_draws(d: torch.Tensor, m: int, embedding_dim: int, generators: list[torch.Generator | None],
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance-weighted negatives of every member's batches, each member from its own generator.

    Args:
        d: (M, T, B, B) non-squared distances (detached), blocks of m.
        generators: M generators, member i's draws consumed exactly as ``BatchedTripletLoss.sample_negatives``
            consumes its generator for that member's (T, B, B) distances (one ``multinomial`` of m − 1 draws
            per row).
    Returns:
        ``(n, valid)``: (M, T, K) sampled negatives of the :func:`block_pairs` pairs and (M, T, K) bool (False
        where the anchor had no eligible negative).
    """
    mm, t, b, _ = d.shape
    w = dws_weights(d.reshape(mm * t, b, b), m, embedding_dim).view(mm, t, b, b)
    has_neg = w.sum(dim=-1) > 0  # (M, T, B)
    rows = torch.where(has_neg.unsqueeze(-1), w, torch.ones((), device=d.device)).reshape(mm, t * b, b)
    a, _, rank = block_pairs(b, m, d.device)
    draws = torch.stack([torch.multinomial(rows[i], m - 1, replacement=True, generator=generators[i])
                         for i in range(mm)]).view(mm, t, b, m - 1)
    return draws[:, :, a, rank], has_neg[:, :, a]


def dws_triplet(d: torch.Tensor, n: torch.Tensor, valid: torch.Tensor, m: int, *, margin: float,
                reducer: MetricReduction | str = MetricReduction.nonzero) -> torch.Tensor:
    """Triplet loss over distance-weighted negatives (paper eq. 4): d (G, B, B) non-squared distances in blocks of
    m, n / valid (G, K) from :func:`dws_draws` → (G,)."""
    g, b, _ = d.shape
    a, p, _ = block_pairs(b, m, d.device)
    ap = d[:, a, p]  # (G, K)
    an = torch.gather(d[:, a, :], 2, n.unsqueeze(-1)).squeeze(-1)
    return reduce_rows(F.relu(ap - an + margin) * valid, reducer, valid.sum(dim=1))


def distances(z: torch.Tensor, *, squared: bool, anchors: torch.Tensor | None = None) -> torch.Tensor:
    """(G, B, E) → (G, B, B) distances of the L2-normalised rows (of ``anchors`` to ``z`` if given)."""
    return _distances(z, squared, anchors)
