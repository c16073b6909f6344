"""Direction Regularization (DR-Triplet, DR-ProxyNCA) and ProxyNCA++ as metric losses.

Every loss here is an ``nn.Module`` with

* ``forward(embeddings (B, E), labels (B,)) -> scalar``: the loss of one batch, and
* ``forward_batched(embeddings (T, B, E), labels (B,)) -> scalar``: the mean over ``t`` of
  ``forward(embeddings[t], labels)``, vectorised. DVML applies its metric loss to ``T`` synthetic
  batches ẑ that share the labels of the real batch; this is that call.

Notation: ``x̂ = x / ‖x‖₂`` (``torch.nn.functional.normalize``), ``d(u, v) = ‖u − v‖₂`` (not squared),
``cos(u, v) = ⟨u, v⟩ / (‖u‖ ‖v‖)`` with the convention ``cos := 0`` when ``‖u‖ ≤ eps`` or
``‖v‖ ≤ eps`` (a zero-length direction has no direction; the term then contributes neither value nor
gradient, so identical points never give NaN). Default eps = 1e-3: distances come from one matmul,
``‖u‖² + ‖v‖² − 2⟨u, v⟩`` (as pml's ``LpDistance`` via ``torch.cdist`` computes them), whose float32
noise between coincident unit vectors is about √1e-7 ≈ 3e-4; below 1e-3 a direction is noise.

**DR-Triplet** (Mohan et al., "Moving in the Right Direction", CVPR 2020). With ``x`` the (by default
L2-normalised) embeddings, for each triplet ``(a, p, n)`` (``y_a = y_p``, ``a ≠ p``, ``y_n ≠ y_a``)::

    ℓ(a, p, n) = relu( d(x_a, x_p) − d(x_a, x_n) + margin − γ · cos(x_p − x_a, x_n − x_a) )

A negative lying in the positive's direction from the anchor (cos → 1) counts less, so the gradient
pushes negatives away perpendicular to the anchor–positive line. The batch loss is the **mean of ``ℓ`` over
all triplets** (``MetricReduction.mean``), as the reference implementation of seed ``003_…``
(alpoler/mohan2020, ``loss/mvrloss.py``, ``MVR_Triplet``: ``torch.mean(penalties)``) computes it — its Optuna-tuned
margin 0.278 and γ 0.492 (the defaults here) were found with that mean. ``MetricReduction.nonzero`` (the
reduction of pytorch-metric-learning's ``TripletMarginLoss``: ``AvgNonZeroReducer``) averages over the triplets
with ``ℓ > 0`` instead; with it and γ = 0 this is pml's ``TripletMarginLoss(margin)`` (``LpDistance``: normalised
embeddings, p = 2, power 1), up to float rounding.
Triplets are all valid triplets of the batch, or those a pml-style miner returns.

**DR-ProxyNCA** as seed ``003_…``'s reference implementation defines it (alpoler/mohan2020, ``loss/mvrloss.py``,
``MVR_Proxy``; ProxyNCA of Movshovitz-Attias et al., ICCV 2017, whose denominator holds the *negative* proxies
only). With ``x̂_i`` the normalised embedding, ``p̂_c`` the normalised proxies and ``d_ic = ‖x̂_i − p̂_c‖`` the
plain (not squared) distance::

    ℓ_i = s·d_{i y_i} + log Σ_{c ≠ y_i} exp( −s · (d_ic + γ · cos(p̂_{y_i} − x̂_i, p̂_c − x̂_i)) )

i.e. ``−log( exp(−s·d_iy) / Σ_{c≠y} exp(−s·(d_ic + γ·cos_ic)) )``: a negative proxy lying in the direction of the
sample's own proxy repels less. ``s`` (``1 / temperature``) multiplies the whole exponent, so the relative weight of
the direction term is the reference's at every ``s``; the reference has none (s = 1, the default). ℓ can be
negative (the positive is not in the denominator). Batch loss: mean of ``ℓ_i``. The reference's network
L2-normalises its embeddings and its proxies start on the unit sphere without being renormalised; here both are
normalised in the loss (identical at initialisation; keeps the loss scale-free when the proxies train with a
larger learning rate than the heads). The seed's command line trains it with γ = 0.45 (``--mvr_reg 0.45``), the
default.

**ProxyNCA++** (Teh et al., ECCV 2020; official code euwern/proxynca_pp, ``loss.py``, ``ProxyNCA_prob``): the
normalised squared distances ``D_ic = ‖x̂_i − p̂_c‖²``, a temperature ``τ`` (the code scales embeddings and proxies
by ``√(1/τ)``) and the positive proxy in the denominator::

    log q_ic = log_softmax_c( −D_ic / τ )
    ℓ_i = −Σ_c t_ic · log q_ic,   t_{i y_i} = 1 − ε,  t_ic = ε / (C − 1) for c ≠ y_i

the smoothed targets of the official ``binarize_and_smooth_labels`` (which the official training calls with
ε = 0: the default here; ε spreads over the C − 1 negatives, unlike ``F.cross_entropy(label_smoothing=ε)``'s ε/C
over every class). Batch loss: mean. τ's default is :data:`PROXY_NCA_PP_TEMPERATURE` (see there).

Proxies are ``nn.Parameter`` of shape (C, E), initialised ``N(0, 1)`` as in pml, so they are in the
loss ``state_dict`` and form their own optimizer group: dvml's trainers give them ``proxy_lr``
(:data:`dvml.heads.config.DEFAULT_PROXY_LR`, 0.1, whatever the heads' lr: ProxyNCA++'s "fast moving proxies").
Labels must be class indices in ``[0, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvml.losses.names import LOSS_PARAM_DEFAULTS, LossName, MetricReduction

#: Seed 003's Optuna-tuned DR-Triplet values (Adam lr 1e-5, batch 128, 64-D).
DR_TRIPLET_MARGIN = LOSS_PARAM_DEFAULTS[LossName.dr_triplet]["margin"]
DR_TRIPLET_GAMMA = LOSS_PARAM_DEFAULTS[LossName.dr_triplet]["gamma"]
#: Norms at or below this give cos := 0 (see the module docstring).
COS_EPS = 1e-3
#: DR-ProxyNCA defaults: γ from seed 003's command line for its proxy loss (``--mvr_reg 0.45``); temperature 1
#: (the reference has no scale).
DR_PROXY_NCA_GAMMA = LOSS_PARAM_DEFAULTS[LossName.dr_proxy_nca]["gamma"]
DR_PROXY_NCA_TEMPERATURE = LOSS_PARAM_DEFAULTS[LossName.dr_proxy_nca]["temperature"]
#: ProxyNCA++ default temperature. Teh et al. use 1/9 (scale 3 on 2048-D embeddings of a finetuned ResNet-50);
#: on dvml's linear heads that softmax saturates while classes are still loose (the loss is won at cos(z, own
#: proxy) ≈ 0.35–0.45 and its gradient vanishes), and 1/4 was chosen on held-out *training* classes
#: (``--val-classes``) of a synth world and wordnet_dev (README, "Proxy losses").
PROXY_NCA_PP_TEMPERATURE = LOSS_PARAM_DEFAULTS[LossName.proxy_nca_pp]["temperature"]
#: ProxyNCA++ default label smoothing: 0, as the official training code calls it.
PROXY_NCA_PP_LABEL_SMOOTHING = LOSS_PARAM_DEFAULTS[LossName.proxy_nca_pp]["label_smoothing"]

Miner = Callable[[Tensor, Tensor], tuple[Tensor, ...]]


#: The reductions DR-Triplet takes (:class:`~dvml.losses.names.MetricReduction`, the triplet losses' one enum):
#: ``nonzero`` = the mean over triplets with loss > 0 (pml AvgNonZeroReducer), ``mean`` = over all triplets.
DR_TRIPLET_REDUCTIONS = (MetricReduction.nonzero, MetricReduction.mean)


def _check_batch(embeddings: Tensor, labels: Tensor, batched: bool) -> None:
    want = 3 if batched else 2
    if embeddings.ndim != want:
        shape = "(T, B, E)" if batched else "(B, E)"
        raise ValueError(f"embeddings must have shape {shape}, got {tuple(embeddings.shape)}")
    if labels.ndim != 1 or labels.shape[0] != embeddings.shape[-2]:
        raise ValueError(f"labels must have shape (B,) = ({embeddings.shape[-2]},), got {tuple(labels.shape)}")


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """``‖x_i − y_j‖²`` as ``‖x_i‖² + ‖y_j‖² − 2⟨x_i, y_j⟩`` clamped at 0 (one matmul, as torch.cdist's
    matmul path and so pml's ``LpDistance`` compute it); x (..., N, E), y (..., M, E) -> (..., N, M)."""
    d2 = x.pow(2).sum(-1)[..., :, None] + y.pow(2).sum(-1)[..., None, :] - 2.0 * (x @ y.transpose(-1, -2))
    return d2.clamp_min(0.0)


def safe_sqrt(d2: Tensor) -> Tensor:
    """``sqrt(d2)`` with value and gradient 0 where ``d2 == 0`` (no infinite gradient at identical points)."""
    pos = d2 > 0
    return torch.where(pos, torch.where(pos, d2, torch.ones_like(d2)).sqrt(), torch.zeros_like(d2))


def safe_inverse(d: Tensor, eps: float) -> Tensor:
    """``1 / d`` where ``d > eps``, else 0 — value and gradient (the double ``where`` keeps the masked
    branch out of the backward pass, so zero lengths give neither NaN nor infinite gradients)."""
    valid = d > eps
    return torch.where(valid, 1.0 / torch.where(valid, d, torch.ones_like(d)), torch.zeros_like(d))


def safe_cosine(dot: Tensor, norm_u: Tensor, norm_v: Tensor, eps: float) -> Tensor:
    """``cos = dot / (norm_u · norm_v)``, and 0 (with zero gradient) where a norm ≤ eps.

    Not clamped: rounding can put it a few ulps outside [−1, 1]. Arguments broadcast together.
    """
    return dot * safe_inverse(norm_u, eps) * safe_inverse(norm_v, eps)


def balanced_blocks(labels: Tensor) -> tuple[Tensor, int] | None:
    """``(order, m)`` when every class of the batch occurs exactly ``m ≥ 2`` times and there are ≥ 2
    classes (a class-balanced batch): ``labels[order]`` is then blocks of ``m`` equal labels. Else None."""
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    m = int(counts[0])
    if len(counts) < 2 or m < 2 or not bool((counts == m).all()):
        return None
    return order, m


def all_triplet_indices(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All valid triplets of a batch as index tensors ``(a, p, n)``, each (K,), in lexicographic order.

    Valid: ``labels[a] == labels[p]``, ``a ≠ p``, ``labels[n] ≠ labels[a]`` (pml's
    ``get_all_triplets_indices``). Built from a (B, B, B) boolean mask: B = 128 takes 2 MiB.
    """
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    mask = pos[:, :, None] & ~same[:, None, :]
    a, p, n = torch.where(mask)
    return a, p, n


class DRTripletLoss(nn.Module):
    """Triplet loss with Direction Regularization (module docstring has the formula).

    Args:
        margin: triplet margin (distance units of the, by default normalised, embeddings).
        gamma: weight γ of the direction term; 0 gives the plain triplet loss.
        miner: optional pml-style miner ``miner(embeddings (B, E), labels (B,)) -> (a, p, n)``; without
            one, all valid triplets of the batch are used.
        normalize_embeddings: L2-normalise embeddings first (pml ``LpDistance`` default).
        reduction: :data:`DR_TRIPLET_REDUCTIONS` (default: ``mean`` over all triplets, the seed reference's).
        eps: norms ≤ eps make the cosine 0 (see :func:`safe_cosine`).

    All valid triplets are computed without a python loop: class-balanced batches (every class m ≥ 2
    times, what dvml's sampler draws) as a dense (T, B/m, m, m, B) tensor of broadcast views
    (:meth:`balanced_triplet_losses`), other batches by gathering listed triplets (:meth:`triplet_losses`).
    """

    def __init__(
        self,
        margin: float = DR_TRIPLET_MARGIN,
        gamma: float = DR_TRIPLET_GAMMA,
        miner: Miner | None = None,
        *,
        normalize_embeddings: bool = True,
        reduction: MetricReduction | str = MetricReduction.mean,
        eps: float = COS_EPS,
    ) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.margin = float(margin)
        self.gamma = float(gamma)
        self.miner = miner
        self.normalize_embeddings = normalize_embeddings
        self.reduction = MetricReduction(reduction)
        if self.reduction not in DR_TRIPLET_REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(r.value for r in DR_TRIPLET_REDUCTIONS)}, got "
                             f"{self.reduction.value!r}")
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, gamma={self.gamma}, reduction={self.reduction.value}"

    def _prepare(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """(T, B, E) -> (squared distances D2, distances D), both (T, B, B)."""
        x = F.normalize(embeddings, p=2, dim=-1) if self.normalize_embeddings else embeddings
        d2 = squared_distances(x, x)
        return d2, safe_sqrt(d2)

    def triplet_losses(self, embeddings: Tensor, a: Tensor, p: Tensor, n: Tensor) -> Tensor:
        """Per-triplet losses ℓ(a, p, n) of listed triplets (before reduction).

        Args:
            embeddings: (T, B, E), T batches sharing the triplet indices.
            a, p, n: (K,) int64 indices into the B axis.

        Returns:
            (T, K) losses ≥ 0. Memory is O(T·B² + T·K), never O(T·B³) floats: one (T, B, B) distance
            matrix (a batched matmul), from which ``d_ap``, ``d_an`` and ``d_pn`` are gathered; the
            cosine's numerator is the law of cosines ``⟨x_p − x_a, x_n − x_a⟩ = (d_ap² + d_an² − d_pn²) / 2``.
        """
        d2, dist = self._prepare(embeddings)
        t, b, _ = dist.shape
        dist = dist.reshape(t, b * b)
        d_ap = dist.index_select(1, a * b + p)  # (T, K); index_select's backward is one index_add
        d_an = dist.index_select(1, a * b + n)
        violation = d_ap - d_an + self.margin
        if self.gamma != 0.0:
            d2 = d2.reshape(t, b * b)
            dot = 0.5 * (d2.index_select(1, a * b + p) + d2.index_select(1, a * b + n) - d2.index_select(1, p * b + n))
            violation = violation - self.gamma * safe_cosine(dot, d_ap, d_an, self.eps)
        return F.relu(violation)

    def balanced_triplet_losses(self, embeddings: Tensor, order: Tensor, m: int) -> tuple[Tensor, Tensor]:
        """All-triplet losses of class-balanced batches as one dense, gather-free tensor.

        With the batch sorted into ``k = B / m`` blocks of one class each, anchor (c, u), positive (c, v) and
        negative n index a (T, k, m, m, B) tensor whose every operand is a broadcast view of a (T, B, B)
        matrix: ``d_ap = D[(c,u), (c,v)]``, ``d_an = D[(c,u), n]``, ``d_pn = D[(c,v), n]``. Entries with
        ``u = v`` or ``n`` in class c are not triplets and are zeroed by the returned mask.

        Args:
            embeddings: (T, B, E); order, m: from :func:`balanced_blocks` of the labels.

        Returns:
            (losses (T, k, m, m, B) ≥ 0 and 0 off the mask, mask (k, m, m, B) bool), with
            ``mask.sum() = B·(m − 1)·(B − m)`` triplets.
        """
        d2, dist = self._prepare(embeddings[:, order])
        t, b, _ = dist.shape
        k = b // m

        def ap(mat: Tensor) -> Tensor:  # (T, B, B) -> (T, k, m, m, 1): within-class blocks
            return mat.view(t, k, m, k, m).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)[..., None]

        d_an = dist.view(t, k, m, 1, b)
        violation = ap(dist) - d_an + self.margin
        if self.gamma != 0.0:
            inv = safe_inverse(dist, self.eps)
            dot = ap(d2) + d2.view(t, k, m, 1, b) - d2.view(t, k, 1, m, b)  # 2 ⟨x_p − x_a, x_n − x_a⟩
            violation = violation - dot * ((0.5 * self.gamma) * ap(inv)) * inv.view(t, k, m, 1, b)
        block = torch.arange(b, device=dist.device) // m
        off_diag = ~torch.eye(m, dtype=torch.bool, device=dist.device)
        mask = off_diag[None, :, :, None] & (
            block[None, None, None, :] != torch.arange(k, device=dist.device)[:, None, None, None]
        )
        return F.relu(violation).masked_fill(~mask, 0.0), mask

    def _reduce(self, losses: Tensor, n_triplets: int, embeddings: Tensor) -> Tensor:
        """(T, ...) losses (0 off the triplets) -> mean over t of the per-batch reduction; exact 0 (kept in
        the graph) if there is no triplet."""
        if n_triplets == 0:
            return (embeddings * 0).sum()
        losses = losses.flatten(1)
        if self.reduction is MetricReduction.mean:
            return losses.sum(dim=1).mean() / n_triplets
        count = (losses > 0).sum(dim=1).clamp_min(1)  # rows without a positive loss sum to 0 -> 0
        return (losses.sum(dim=1) / count).mean()

    def _all_triplets(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Reduced loss over all valid triplets of (T, B, E) batches sharing ``labels``."""
        blocks = balanced_blocks(labels)
        if blocks is not None:
            losses, mask = self.balanced_triplet_losses(embeddings, *blocks)
            return self._reduce(losses, int(mask.sum()), embeddings)
        a, p, n = all_triplet_indices(labels)
        return self._reduce(self.triplet_losses(embeddings, a, p, n), len(a), embeddings)

    def _indices(self, embeddings: Tensor, labels: Tensor, indices_tuple) -> tuple[Tensor, Tensor, Tensor]:
        if indices_tuple is None and self.miner is not None:
            indices_tuple = self.miner(embeddings, labels)
        if indices_tuple is None:
            return all_triplet_indices(labels)
        if len(indices_tuple) != 3:
            raise ValueError(f"DR-Triplet needs triplet indices (a, p, n), got a {len(indices_tuple)}-tuple")
        return tuple(t.to(device=embeddings.device, dtype=torch.long) for t in indices_tuple)

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple=None) -> Tensor:
        """Loss of one batch: embeddings (B, E), labels (B,), optional triplets ``(a, p, n)`` -> scalar."""
        _check_batch(embeddings, labels, batched=False)
        if indices_tuple is None and self.miner is None:
            return self._all_triplets(embeddings[None], labels)
        a, p, n = self._indices(embeddings, labels, indices_tuple)
        return self._reduce(self.triplet_losses(embeddings[None], a, p, n), len(a), embeddings)

    def forward_batched(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean over t of ``forward(embeddings[t], labels)``; embeddings (T, B, E), labels (B,) -> scalar.

        Without a miner all T batches share the triplets of ``labels`` and the losses are computed as
        one tensor (dense per class block for class-balanced batches, gathered (T, K) otherwise); with a
        miner each batch is mined on its own (a loop over T, not triplets).
        """
        _check_batch(embeddings, labels, batched=True)
        if self.miner is not None:
            return torch.stack([self.forward(e, labels) for e in embeddings]).mean()
        return self._all_triplets(embeddings, labels)


class _ProxyLoss(nn.Module):
    """Shared part of the proxy losses: proxies (C, E), the temperature τ > 0, label checks, normalised
    distances."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.temperature = float(temperature)
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_size, generator=generator))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}"

    def _check_labels(self, embeddings: Tensor, labels: Tensor) -> None:
        if embeddings.shape[-1] != self.embedding_size:
            raise ValueError(f"embeddings have size {embeddings.shape[-1]}, the proxies {self.embedding_size}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"labels must be class indices in [0, {self.num_classes}), got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )

    def _normalised(self, embeddings: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x̂ (N, E), p̂ (C, E), D_ic = ‖x̂_i − p̂_c‖² (N, C))."""
        x = F.normalize(embeddings, p=2, dim=-1)
        p = F.normalize(self.proxies.to(embeddings.dtype), p=2, dim=-1)
        return x, p, squared_distances(x, p)

    def per_sample(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Per-sample losses ℓ_i, (N,)."""
        raise NotImplementedError

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean over the batch of ℓ_i; embeddings (B, E), labels (B,) in [0, C) -> scalar."""
        _check_batch(embeddings, labels, batched=False)
        self._check_labels(embeddings, labels)
        return self.per_sample(embeddings, labels).mean()

    def forward_batched(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean over t of ``forward(embeddings[t], labels)`` (= mean over the flattened T·B samples)."""
        _check_batch(embeddings, labels, batched=True)
        self._check_labels(embeddings, labels)
        t, b, e = embeddings.shape
        return self.per_sample(embeddings.reshape(t * b, e), labels.repeat(t)).mean()


class DRProxyNCALoss(_ProxyLoss):
    """DR-ProxyNCA as seed 003's reference defines it (module docstring has the formula and its source).

    Args:
        num_classes: C, number of training classes (labels in [0, C)).
        embedding_size: E.
        gamma: weight γ of the direction term (default 0.45, the seed's command line); 0 gives ProxyNCA over
            plain distances with the negatives-only denominator.
        temperature: τ > 0; the exponent ``−(d + γ·cos)`` is divided by it (default 1: the reference's).
        eps: norms ≤ eps make the cosine 0.
        generator: torch.Generator for the N(0, 1) proxy initialisation.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        gamma: float = DR_PROXY_NCA_GAMMA,
        temperature: float = DR_PROXY_NCA_TEMPERATURE,
        *,
        eps: float = COS_EPS,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_classes, embedding_size, temperature=temperature,
                         generator=generator)
        self.gamma = float(gamma)
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, temperature={self.temperature}"

    def per_sample(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x, p, d2 = self._normalised(embeddings)  # (N, E), (C, E), (N, C)
        d = safe_sqrt(d2)  # plain distances ‖x̂_i − p̂_c‖
        exponent = d
        if self.gamma != 0.0:
            u = p[labels] - x  # x -> own proxy, (N, E)
            # ⟨p̂_y − x̂, p̂_c − x̂⟩ = ⟨u, p̂_c⟩ − ⟨u, x̂⟩, (N, C)
            dot = u @ p.T - (u * x).sum(dim=1, keepdim=True)
            norm_u = safe_sqrt(u.square().sum(dim=1, keepdim=True))  # ‖p̂_y − x̂‖, (N, 1), exact
            exponent = d + self.gamma * safe_cosine(dot, norm_u, d, self.eps)
        own = torch.zeros_like(d2, dtype=torch.bool).scatter_(1, labels[:, None], True)
        negatives = (-exponent / self.temperature).masked_fill(own, float("-inf"))
        return d.gather(1, labels[:, None]).squeeze(1) / self.temperature + torch.logsumexp(negatives, dim=1)


class ProxyNCAPlusPlusLoss(_ProxyLoss):
    """ProxyNCA++ (Teh et al., ECCV 2020; module docstring has the formula and the official code it follows).

    Args:
        num_classes: C, number of training classes (labels in [0, C)).
        embedding_size: E.
        temperature: τ > 0 (default :data:`PROXY_NCA_PP_TEMPERATURE`).
        label_smoothing: ε in [0, 1): target 1 − ε on the own proxy, ε / (C − 1) on each other one (default 0,
            the official training's).
        generator: torch.Generator for the N(0, 1) proxy initialisation.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        temperature: float = PROXY_NCA_PP_TEMPERATURE,
        label_smoothing: float = PROXY_NCA_PP_LABEL_SMOOTHING,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_classes, embedding_size, temperature=temperature,
                         generator=generator)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}, label_smoothing={self.label_smoothing}"

    def per_sample(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        _, _, d2 = self._normalised(embeddings)
        logq = torch.log_softmax(-d2 / self.temperature, dim=1)  # (N, C)
        nll = -logq.gather(1, labels[:, None]).squeeze(1)
        eps = self.label_smoothing
        if eps == 0.0:
            return nll
        others = -logq.sum(dim=1) - nll  # −Σ_{c≠y} log q_c
        return (1.0 - eps) * nll + (eps / (self.num_classes - 1)) * others
