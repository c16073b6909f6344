"""Metric losses Lm by name, each applied to T batches of embeddings at once and averaged over T.

DVML applies its metric loss to the invariant embeddings z_I (one batch, ``(B, E)``) and to the T synthetic
batches ẑ (``(T, B, E)``, all with the labels of their source images). Every loss here is a
:class:`MetricLoss`: ``forward(embeddings (T, B, E) | (B, E), labels (B,)) -> scalar``, equal to the mean over
t of the pytorch-metric-learning (pml) loss of batch t. How the T batches are computed depends on the loss:

* **batched** (``triplet``, ``triplet-dws``, ``npair``: the paper's three losses, eqs. 2-4): our own
  implementations over a ``(T, B, B)`` stack of distance matrices — no python loop over T or samples. Each is
  tested against the pml loss (same distance, margin, triplet set and reducer) looped over t. The
  direction-regularised losses (``dr-triplet``, ``dr-proxy-nca``, ``proxy-nca-pp``) bring their own vectorised
  ``forward_batched``.
* **flatten** (``proxy-nca``): a per-sample loss with a plain mean, so the T batches are one ``(T·B, E)`` batch.
* **loop** (every other pml loss): the pml loss (+ miner) called once per t. Correct by construction; slower
  for large T.

Settings (``make_metric_loss``) — the papers' own, where the DVML paper is silent:

======================  =======================================================================================
triplet (eq. 2)         all triplets of the batch, squared euclidean distance of L2-normalised embeddings,
                        margin 0.2, mean over triplets with non-zero loss (pml ``TripletMarginLoss``'s reducer)
triplet-dws (eq. 4)     non-squared distance, margin 0.2; negatives drawn by distance-weighted sampling (Wu et
                        al. 2017, pml ``DistanceWeightedMiner``: cutoff 0.5, nonzero_loss_cutoff 1.4), one per
                        (anchor, positive) pair
npair (eq. 3)           one (anchor, positive) pair per class, raw dot-product logits z_i·z_j (eq. 3; pml's
                        default would L2-normalise them), plus
                        Sohn's 0.002·mean‖z‖² embedding regulariser (not in eq. 3; it keeps dot-product norms
                        bounded)
contrastive             pml ContrastiveLoss (pos margin 0, neg margin 1, normalised distance)
lifted                  pml LiftedStructureLoss (neg margin 1)
angular                 pml AngularLoss (alpha 40°)
proxy-nca               pml ProxyNCALoss with softmax scale 9 (= proxies and embeddings both scaled to norm 3,
                        as in the reference implementations; scale 1 gives almost flat softmaxes)
multi-similarity        pml MultiSimilarityLoss (alpha 2, beta 50, base 0.5) + MultiSimilarityMiner (eps 0.1)
proxy-anchor            pml ProxyAnchorLoss (margin 0.1, alpha 32)
dr-triplet              DRTripletLoss(margin=0.278, gamma=0.492), mean over all triplets (dvml.losses.dr;
                        seed 003's reference definition and its tuned values)
dr-proxy-nca            DRProxyNCALoss(num_classes, embedding_size, gamma=0.45, temperature=1) (seed 003's
                        reference definition and command line)
proxy-nca-pp            ProxyNCAPlusPlusLoss(num_classes, embedding_size, temperature=1/4, label_smoothing=0)
                        (Teh et al. 2020's definition and official smoothing 0; τ chosen on held-out training
                        classes, their 1/9 saturates on linear heads)
======================  =======================================================================================

Every margin, γ, temperature and label smoothing above is the default of a fit option (``--margin``,
``--gamma``, ``--temperature``, ``--label-smoothing``; :data:`dvml.heads.config.LOSS_PARAM_DEFAULTS` says which
loss takes which): the contrastive and lifted ``--margin`` is their negative margin, proxy-anchor's its margin.

Proxy losses hold their proxies as ``nn.Parameter`` s (in ``parameters()`` of the returned module); labels must
be 0..C-1 (the trainer maps them). ``make_metric_loss(..., seed=s)`` draws them from an RNG stream of their own
derived from ``s`` (the global RNG is left as it was), so a baseline and a DVML fit at one seed start from the
same proxies whatever layers were built before.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from dvml.losses.names import CROSS_PAIR_NAMES, LOSS_PARAM_DEFAULTS, LossName, MetricReduction
from dvml.losses.registry import LossSpec, loss_spec
from dvml.seeding import proxy_seed

TRIPLET_MARGIN = LOSS_PARAM_DEFAULTS[LossName.triplet]["margin"]
DWS_CUTOFF = 0.5
DWS_NONZERO_LOSS_CUTOFF = 1.4
NPAIR_L2_REG = 0.002


def _as_tb(embeddings: torch.Tensor) -> torch.Tensor:
    if embeddings.dim() == 2:
        return embeddings.unsqueeze(0)
    if embeddings.dim() != 3:
        raise ValueError(f"embeddings must be (B, E) or (T, B, E), got shape {tuple(embeddings.shape)}")
    return embeddings


def block_triplet_violations(d: torch.Tensor, m: int, margin: float) -> tuple[torch.Tensor, int]:
    """The hinge of every triplet of batches whose classes sit in contiguous blocks of ``m`` images.

    ``d`` (T, B, B): each batch's distances, anchors as rows (B = C·m, block c = rows c·m … c·m + m − 1). Returns
    ``(v, count)``: ``v`` (T, C·m·m·B) = relu(d(a, p) − d(a, n) + margin) over anchor a, positive p of a's block
    (p ≠ a) and negative n of another block (the non-triplets are 0), and ``count`` = the number of real triplets
    per batch, C·m·(m − 1)·(B − m) (at least 1).
    """
    t, b, _ = d.shape
    c = b // m
    d5 = d.view(t, c, m, c, m)
    idx = torch.arange(c, device=d.device)
    ap = d5[:, idx, :, idx, :].transpose(0, 1)  # (T, C, m, m): anchor j, positive k of the same block
    eye = torch.eye(m, dtype=torch.bool, device=d.device)
    ap = ap.masked_fill(eye, float("-inf"))  # an image is not its own positive
    same_block = torch.eye(c, dtype=torch.bool, device=d.device).repeat_interleave(m, dim=1)  # (C, B)
    an = d.view(t, c, m, b).masked_fill(same_block[None, :, None, :], float("inf"))  # (T, C, m, B)
    v = F.relu(ap.unsqueeze(-1) - an.unsqueeze(-2) + margin)  # (T, C, m, m, B)
    return v.reshape(t, -1), max(1, c * m * (m - 1) * (b - m))


class Strategy(str, Enum):
    """How a :class:`MetricLoss` computes its T batches (the module docstring)."""

    batched = "batched"  # one vectorised pass over (T, B, E)
    flatten = "flatten"  # a per-sample loss over one (T·B, E) batch
    loop = "loop"  # the loss called once per t


class MetricLoss(nn.Module):
    """Base: ``forward(embeddings (T, B, E) | (B, E), labels (B,)) -> mean over t of Lm(embeddings[t], labels)``.

    ``strategy`` (:class:`Strategy`) says how the T batches are computed.
    """

    strategy = Strategy.loop
    #: The generator of the loss's own random draws (``None``: the global RNG); a trainer may set it per step.
    generator: torch.Generator | None = None
    #: Whether :meth:`forward` takes ``anchors`` (the cross pairs of the synthetic term, ``--synthetic-pairs cross``).
    takes_anchors = False

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                anchors: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over t of Lm(embeddings[t], labels).

        Args:
            embeddings: (T, B, E) or (B, E).
            labels: (B,) class ids.
            anchors: optional (B, E) embeddings of the same B images (z_I) to take every pair's and triplet's
                *anchor* from, while its positive and negative come from ``embeddings[t]``: the pairs and
                triplets of the batch are those of ``Lm(anchors)``, each positive and negative replaced by its row
                of ``embeddings[t]`` (only losses with ``takes_anchors``; ``--synthetic-pairs cross``).
        """
        if anchors is None:
            return self.forward_tb(_as_tb(embeddings), labels)
        if not self.takes_anchors:
            raise ValueError(f"{type(self).__name__} takes no anchors (cross pairs are for {CROSS_PAIR_NAMES})")
        z = _as_tb(embeddings)
        if anchors.shape != z.shape[1:]:
            raise ValueError(f"anchors must be (B, E) = {tuple(z.shape[1:])}, got {tuple(anchors.shape)}")
        return self.forward_tb(z, labels, anchors)

    def forward_tb(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class LoopOverT(MetricLoss):
    """Any ``loss(emb, labels[, indices_tuple])`` module (+ optional pml miner), called once per t."""

    strategy = Strategy.loop

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward_tb(self, z, labels):
        total = z.new_zeros(())
        for t in range(z.shape[0]):
            if self.miner is not None:
                total = total + self.loss(z[t], labels, self.miner(z[t], labels))
            else:
                total = total + self.loss(z[t], labels)
        return total / z.shape[0]


class ForwardBatched(MetricLoss):
    """A loss module with its own vectorised ``forward_batched(embeddings (T, B, E), labels (B,))`` (the
    direction-regularised losses of :mod:`dvml.losses.dr`); ``(B, E)`` inputs go through it as T = 1."""

    strategy = Strategy.batched

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward_tb(self, z, labels):
        return self.loss.forward_batched(z, labels)


class FlattenT(MetricLoss):
    """A per-sample loss with a plain mean over samples: the T batches are one (T·B, E) batch."""

    strategy = Strategy.flatten

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward_tb(self, z, labels):
        t, b, e = z.shape
        return self.loss(z.reshape(t * b, e), labels.repeat(t))


def _sorted_blocks(labels: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """If every class of the batch has the same count m: (order (B,) grouping classes into contiguous blocks
    of m, m); else None."""
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    m = int(counts[0])
    if m < 2 or not bool((counts == m).all()):
        return None
    return order, m


def _pair_distances(z: torch.Tensor, squared: bool, anchors: torch.Tensor | None = None) -> torch.Tensor:
    """(T, B, E) → (T, B, B) euclidean distances of the L2-normalised rows (squared if asked): ``d[t, i, j]`` =
    D(z[t, i], z[t, j]), or D(anchors[i], z[t, j]) with (B, E) ``anchors``.

    ‖a − b‖² = 2 − 2 a·b for unit vectors: one batched matmul. The non-squared distance is clamped at 1e-12
    before the square root, so identical rows give a finite (zero) gradient.
    """
    u = F.normalize(z, p=2, dim=-1)
    ua = u if anchors is None else F.normalize(anchors, p=2, dim=-1).expand_as(u)
    d2 = (2.0 - 2.0 * torch.bmm(ua, u.transpose(1, 2))).clamp_min(0.0)
    return d2 if squared else d2.clamp_min(1e-12).sqrt()


def _avg_nonzero(v: torch.Tensor) -> torch.Tensor:
    """(T, K) non-negative losses → mean over t of (mean of the strictly positive entries of row t, or 0)."""
    pos = (v > 0).sum(dim=1)
    per_t = v.sum(dim=1) / pos.clamp_min(1)
    return per_t.mean()


TRIPLET_REDUCERS = tuple(r.value for r in MetricReduction)


def _reduce_triplets(v: torch.Tensor, reducer: str, count: torch.Tensor | int | None = None) -> torch.Tensor:
    """(T, K) per-triplet losses → scalar, mean over t of: ``"nonzero"`` = the mean over the triplets with a
    non-zero loss (:func:`_avg_nonzero`, pml's default reducer); ``"sum"`` = the sum over the K triplets (the
    paper's eqs. 2 and 4); ``"mean"`` = the plain mean over the K triplets (the sum / K: the paper's relative
    weights of Lm(ẑ) and Lm(z_I) at a batch-size-independent scale). ``count``: the number of real triplets
    per t (int or (T,) tensor) when ``v`` also holds zeros for impossible ones (default K); only ``"mean"`` uses
    it."""
    if reducer == "sum":
        return v.sum(dim=1).mean()
    if reducer == "mean":
        n = v.shape[1] if count is None else count
        if isinstance(n, torch.Tensor):
            n = n.clamp_min(1)
        return (v.sum(dim=1) / n).mean()
    return _avg_nonzero(v)


class BatchedTripletLoss(MetricLoss):
    """Triplet loss over all triplets of each batch (paper eq. 2), or over distance-weighted negatives (eq. 4).

    ``max(0, margin + D(a, p) − D(a, n))`` with D the (squared, if ``squared``) euclidean distance of
    L2-normalised embeddings; per batch the mean over triplets with a non-zero loss (0 if none), then the mean
    over the T batches. Equals pml ``TripletMarginLoss(margin, distance=LpDistance(power=2 if squared else 1))``
    looped over t.

    With ``dws=True`` (Triplet₂ + DWS), each (anchor, positive) pair gets one negative drawn with probability ∝
    the inverse density of distances between uniform points on the unit sphere of dimension E (pml
    ``DistanceWeightedMiner``'s weights: distances clipped below at ``cutoff``, zero weight at or beyond
    ``nonzero_loss_cutoff``), independently for every t. Anchors without any eligible negative contribute no
    triplet. ``generator`` drives the draws (a trainer may replace it per step).
    """

    strategy = Strategy.batched
    takes_anchors = True

    def __init__(self, margin: float = TRIPLET_MARGIN, squared: bool = True, dws: bool = False,
                 cutoff: float = DWS_CUTOFF, nonzero_loss_cutoff: float = DWS_NONZERO_LOSS_CUTOFF,
                 reducer: MetricReduction | str = MetricReduction.nonzero, fixed_triplets: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        try:
            reducer = MetricReduction(reducer)
        except ValueError:
            raise ValueError(f"reducer must be one of {', '.join(TRIPLET_REDUCERS)}, got {reducer!r}") from None
        if fixed_triplets and dws:
            raise ValueError("fixed_triplets (the triplet input) and dws exclude each other")
        self.margin, self.squared, self.dws = float(margin), squared, dws
        self.reducer, self.fixed_triplets = reducer, fixed_triplets
        self.cutoff, self.nonzero_loss_cutoff = float(cutoff), float(nonzero_loss_cutoff)
        self.generator = generator
        self.embedding_dim = 0

    def forward_tb(self, z, labels, anchors=None):
        if self.fixed_triplets:
            return self._fixed(z, labels, anchors)
        if self.dws:
            return self._dws(z, labels, anchors)
        blocks = _sorted_blocks(labels)
        if blocks is not None:
            return self._all_triplets_blocks(z, *blocks, anchors)
        return self._all_triplets_general(z, labels, anchors)

    def _fixed(self, z, labels, anchors=None):
        """The triplet input (paper section 3.5): the batch is [anchors; positives; negatives], K = B/3 each."""
        b = z.shape[1]
        if b % 3:
            raise ValueError(f"the triplet input needs a batch of 3·K rows (anchors, positives, negatives), got {b}")
        k = b // 3
        u = F.normalize(z, p=2, dim=-1)
        a = u[:, :k] if anchors is None else F.normalize(anchors[:k], p=2, dim=-1).expand_as(u[:, :k])
        p, n = u[:, k:2 * k], u[:, 2 * k:]
        dap, dan = (a - p).square().sum(-1), (a - n).square().sum(-1)  # (T, K)
        if not self.squared:
            dap, dan = dap.clamp_min(1e-12).sqrt(), dan.clamp_min(1e-12).sqrt()
        return _reduce_triplets(F.relu(dap - dan + self.margin), self.reducer)

    def _all_triplets_blocks(self, z, order, m, anchors=None):
        """Every class has m images: sort into blocks, then one dense (T, C, m, m, B) broadcast."""
        d = _pair_distances(z[:, order], self.squared,  # (T, B, B), classes in contiguous blocks
                            None if anchors is None else anchors[order])
        v, count = block_triplet_violations(d, m, self.margin)
        return _reduce_triplets(v, self.reducer, count)

    def _all_triplets_general(self, z, labels, anchors=None):
        d = _pair_distances(z, self.squared, anchors)
        same = labels[:, None] == labels[None, :]
        pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        a, p, n = torch.nonzero(pos[:, :, None] & ~same[:, None, :], as_tuple=True)
        if a.numel() == 0:
            return z.sum() * 0.0
        v = F.relu(d[:, a, p] - d[:, a, n] + self.margin)  # (T, K)
        return _reduce_triplets(v, self.reducer)

    def dws_weights(self, d: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(T, B, B) non-squared distances of E-dimensional unit vectors → (T, B, B) row-normalised weights.

        log w = (2 − E)·log d − ((E − 3)/2)·log(1 − d²/4) (the inverse density of distances between uniform
        points on the sphere) with d clipped below at ``cutoff``; weight 0 for same-class pairs and for
        d ≥ ``nonzero_loss_cutoff``. Rows without an eligible negative are all 0. E is read from
        ``self.embedding_dim`` (set by the last forward) unless given via :meth:`sample_negatives`.
        """
        e = float(self.embedding_dim)
        dc = d.clamp_min(self.cutoff)
        log_w = (2.0 - e) * torch.log(dc) - ((e - 3.0) / 2.0) * torch.log((1.0 - 0.25 * dc.square()).clamp_min(1e-12))
        eligible = (labels[:, None] != labels[None, :]) & (d < self.nonzero_loss_cutoff) & torch.isfinite(log_w)
        log_w = log_w.masked_fill(~eligible, float("-inf"))
        row_max = log_w.amax(dim=-1, keepdim=True).clamp_min(-1e30)  # rows with no eligible entry: -inf → finite
        w = torch.exp(log_w - row_max)  # exp of ≤ 0; the row normalisation makes the shift irrelevant
        return w / w.sum(dim=-1, keepdim=True).clamp_min(1e-30)

    @torch.no_grad()
    def sample_negatives(self, d: torch.Tensor, labels: torch.Tensor, embedding_dim: int):
        """Distance-weighted negatives for every (anchor, positive) pair and every t.

        Args:
            d: (T, B, B) non-squared distances; labels: (B,); embedding_dim: E.
        Returns:
            ``(a, p, n, valid)``: (K,) anchor and positive indices of the K same-class pairs (sorted by anchor),
            (T, K) sampled negatives and (T, K) bool — False where the anchor had no eligible negative in batch
            t (such pairs contribute nothing).
        """
        self.embedding_dim = embedding_dim
        t, b, _ = d.shape
        w = self.dws_weights(d, labels)
        same = labels[:, None] == labels[None, :]
        pos = same & ~torch.eye(b, dtype=torch.bool, device=labels.device)
        a, p = torch.nonzero(pos, as_tuple=True)
        if a.numel() == 0:
            empty = torch.zeros((t, 0), dtype=torch.long, device=d.device)
            return a, p, empty, empty.bool()
        rank = torch.cumsum(pos.long(), dim=1) - 1  # rank of p among anchor a's positives
        k_max = int(pos.sum(dim=1).max())
        has_neg = w.sum(dim=-1) > 0  # (T, B)
        rows = torch.where(has_neg.reshape(-1, 1), w.reshape(t * b, b), torch.ones((), device=d.device))
        draws = torch.multinomial(rows, k_max, replacement=True, generator=self.generator).view(t, b, k_max)
        return a, p, draws[:, a, rank[a, p]], has_neg[:, a]

    def _dws(self, z, labels, anchors=None):
        d = _pair_distances(z, squared=False, anchors=anchors)
        a, p, n, valid = self.sample_negatives(d.detach(), labels, z.shape[-1])
        if a.numel() == 0:
            return z.sum() * 0.0
        ap = d[:, a, p]  # (T, K)
        an = torch.gather(d[:, a, :], 2, n.unsqueeze(-1)).squeeze(-1)  # (T, K)
        return _reduce_triplets(F.relu(ap - an + self.margin) * valid, self.reducer, valid.sum(dim=1))


class BatchedNPairLoss(MetricLoss):
    """Multi-class N-pair loss (paper eq. 3) over T batches at once.

    Per class of the batch, its first two images (in batch order) form the (anchor, positive) pair, as pml
    ``NPairsLoss`` picks them; ``(1/N) Σ_i log(1 + Σ_{j≠i} exp(a_i·p_j − a_i·p_i))`` = cross-entropy of the
    (N, N) dot-product logits with the diagonal as targets; plus ``l2_reg · mean_b ‖z_b‖²`` over every
    embedding of the batch (pml ``embedding_regularizer=LpRegularizer(power=2)``). Mean over t.
    """

    strategy = Strategy.batched
    takes_anchors = True

    def __init__(self, l2_reg: float = NPAIR_L2_REG):
        super().__init__()
        self.l2_reg = float(l2_reg)

    @staticmethod
    def pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchor, positive) batch indices: the first two occurrences of every class with ≥ 2 images."""
        order = torch.argsort(labels, stable=True)
        sl = labels[order]
        first = torch.ones_like(sl, dtype=torch.bool)
        first[1:] = sl[1:] != sl[:-1]
        has_second = torch.zeros_like(first)
        has_second[:-1] = sl[1:] == sl[:-1]
        start = torch.nonzero(first & has_second, as_tuple=True)[0]
        return order[start], order[start + 1]

    def forward_tb(self, z, labels, anchors=None):
        a, p = self.pairs(labels)
        reg = self.l2_reg * z.square().sum(dim=-1).mean() if self.l2_reg else 0.0
        if a.numel() == 0:
            return z.sum() * 0.0 + reg
        za = z[:, a] if anchors is None else anchors[a].expand(z.shape[0], -1, -1)
        logits = torch.bmm(za, z[:, p].transpose(1, 2))  # (T, N, N)
        t, n, _ = logits.shape
        target = torch.arange(n, device=z.device).repeat(t)
        return F.cross_entropy(logits.reshape(t * n, n), target) + reg


def _params(spec: LossSpec, params: dict[str, float]) -> dict[str, float]:
    """``params`` over the loss's defaults (its registry entry's ``params``); unknown ones refused."""
    unknown = set(params) - set(spec.params)
    if unknown:
        raise ValueError(f"loss {spec.name} takes no parameter(s) {sorted(unknown)} (it takes: "
                         f"{', '.join(spec.params) or 'none'})")
    return {**spec.params, **{k: float(v) for k, v in params.items() if v is not None}}


def pml_reference(name: LossName | str, *, num_classes: int, embedding_size: int,
                  **params: float) -> tuple[nn.Module, nn.Module | None]:
    """The pytorch-metric-learning (loss, miner) behind a name, with the settings in the module docstring (the
    registry entry's ``reference``).

    For the batched losses this is the *reference* they are tested against (for ``triplet-dws`` without the
    miner, whose draws are random: tests pass the sampled triplets as an ``indices_tuple``). ``params``: the
    loss's ``margin`` (as for :func:`make_metric_loss`).
    """
    spec = loss_spec(name)
    if spec.reference is None:
        raise ValueError(f"{spec.name} is not a pytorch-metric-learning loss")
    return spec.reference(num_classes, embedding_size, **_params(spec, params))


def make_metric_loss(name: LossName | str, *, num_classes: int, embedding_size: int, seed: int | None = None,
                     reducer: MetricReduction | str | None = None, fixed_triplets: bool = False,
                     generator: torch.Generator | None = None, **params: float) -> MetricLoss:
    """The :class:`MetricLoss` for ``name``, built by its registry entry's factory
    (:mod:`dvml.losses.registry`; the built-in settings are in the module docstring).

    Args:
        name: a registered loss name (:class:`~dvml.losses.names.LossName`, or a plug-in's).
        num_classes: training classes C (proxy losses; labels must be 0..C-1).
        embedding_size: E (proxy losses).
        params: the loss's parameters (``margin``, ``gamma``, ``temperature``, ``label_smoothing``: those its
            registry entry lists, e.g. ``FitConfig.loss_params()``); missing or ``None`` ones take the
            defaults; one the loss does not take raises ``ValueError``.
        reducer: how a loss with the ``reducer`` setting (triplet, triplet-dws) reduces over its triplets
            (``None``: ``nonzero``); ignored by the other losses.
        fixed_triplets: the paper's triplet input (batches of [anchors; positives; negatives]); only for a loss
            with the ``fixed_triplets`` setting (triplet), ``ValueError`` otherwise.
        generator: drives a loss's own random draws (triplet-dws's negatives); ignored by losses without any.
        seed: the fit's seed; when given, every random draw of the construction (the proxies' initialisation)
            comes from a torch RNG seeded with :func:`dvml.seeding.proxy_seed` ``(seed)`` inside
            :func:`torch.random.fork_rng` (CPU), so the proxies depend on the seed alone (the same for a baseline
            and a DVML fit) and the caller's global RNG is untouched.
    """
    spec = loss_spec(name)
    kw = _params(spec, params)
    if fixed_triplets:
        if "fixed_triplets" not in spec.settings:
            raise ValueError(f"triplet_input (fixed triplets) is not for loss {spec.name}")
        kw["fixed_triplets"] = True
    if reducer is not None and "reducer" in spec.settings:
        kw["reducer"] = MetricReduction(reducer)
    if generator is not None and "generator" in spec.settings:
        kw["generator"] = generator
    if seed is None:
        return _as_metric_loss(spec.factory(num_classes, embedding_size, **kw))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(proxy_seed(seed))
        return _as_metric_loss(spec.factory(num_classes, embedding_size, **kw))


def _as_metric_loss(loss: nn.Module) -> MetricLoss:
    """A factory's module as a :class:`MetricLoss` (a plain per-batch loss is looped over the T batches)."""
    return loss if isinstance(loss, MetricLoss) else LoopOverT(loss)
