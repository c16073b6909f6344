"""The DVML objective (paper eq. 12): the two variational terms and one module returning every named term.

``L = λ1·KL + λ2·recon + λ3·Lm(ẑ) + λ4·Lm(z_I)`` with KL and recon (:func:`kl_term`, :func:`recon_term`, paper
eqs. 8 and 9: per-image quantities averaged over the batch and the T draws, summed over their vector
dimension unless ``reduction="mean"``) and Lm a
:class:`~dvml.losses.metric.MetricLoss`: Lm(ẑ) is the metric loss of each of the T synthetic batches
(labels of their source images), averaged over T — with ``synthetic_pairs="cross"``, of each synthetic batch
against the real z_I as anchors. The baseline (``dvml=False``) is ``L = Lm(z_I)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dvml.heads.config import HeadsConfig, Lambdas, Likelihood
from dvml.heads.model import Gather, HeadsOutput
from dvml.losses.metric import MetricLoss, make_metric_loss
from dvml.losses.names import CROSS_PAIR_NAMES, SyntheticPairs


def _reduce(per_dim: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_dim.sum(dim=-1).mean()
    if reduction == "mean":
        return per_dim.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def kl_term(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "sum", free_bits: float = 0.0) -> torch.Tensor:
    """KL(N(μ, σ²I) ‖ N(0, I)) summed over the E dimensions, averaged over the batch (paper eq. 8).

    ``0.5 · Σ_j (σ_j² + μ_j² − 1 − log σ_j²)``, mean over rows.

    Args:
        mu: (B, E) means.
        logvar: (B, E) log variances log σ².
        reduction: ``"sum"`` over E (the paper) or ``"mean"`` over E (the same divided by E).
        free_bits: > 0: each dimension's batch-mean KL counts as at least this many nats, ``Σ_j max(λ,
            mean_i KL_ij)`` (Kingma et al. 2016, "free bits"): below λ a dimension pays nothing, so the KL no
            longer pushes it all the way back to the prior. 0 = the plain KL.
    Returns:
        scalar tensor.
    """
    per = 0.5 * (logvar.exp() + mu.square() - 1.0 - logvar)
    if free_bits > 0:
        per_dim = per.mean(dim=0).clamp_min(free_bits)  # (E,)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        return per_dim.sum() if reduction == "sum" else per_dim.mean()
    return _reduce(per, reduction)


_LOG_2PI = math.log(2.0 * math.pi)


def recon_term(x: torch.Tensor, x_hat: torch.Tensor, reduction: str = "sum", likelihood: Likelihood | str = "l2",
               gather: Gather | None = None) -> torch.Tensor:
    """Reconstruction term of eq. 9, averaged over the T draws and B images.

    ``likelihood="l2"`` (the paper's simplification): ``‖x − x̂‖²`` summed over D. ``"gaussian"``: the negative
    log-likelihood of x under N(x̂, s²I) with the shared variance s² set to its maximum-likelihood value, the
    mean squared error over the batch (the "optimal σ" calibrated decoder of Rybkin et al. 2021, σ-VAE):
    ``(D/2)·(log mse + 1 + log 2π)`` nats per image. Its value and gradient do not depend on the features' units
    (scaling x by a rescales nothing but a constant), so its balance against the KL holds for any backbone.

    Args:
        x: (B, D) targets (the cached backbone features).
        x_hat: (T, B, D) reconstructions of the T synthetic embeddings of each image (or (B, D)).
        reduction: ``"sum"`` over D (the paper) or ``"mean"`` over D (the same divided by D).
        likelihood: ``"l2"`` or ``"gaussian"`` (:class:`~dvml.heads.config.Likelihood`).
        gather: ``x`` is this process's shard of a distributed batch (:data:`~dvml.heads.model.Gather`): the
            gaussian's s² is then the global batch's mean squared error, as in one process (``"l2"`` is a mean
            over rows and needs no gather).
    Returns:
        scalar tensor: ``(1 / (T·B)) Σ_i Σ_t ‖x_i − x̂_{i,t}‖²`` (divided by D for ``"mean"``) for ``"l2"``.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    likelihood = Likelihood(likelihood)
    # one fused kernel (forward and backward) over the (T, B, D) draws instead of sub/square/sum passes
    total = F.mse_loss(x_hat, x.expand_as(x_hat), reduction="sum")
    if likelihood is Likelihood.gaussian:
        if gather is None:
            mse = total / x_hat.numel()
        else:  # every process's (squared error, count): the global batch's s²
            total, count = gather(torch.stack([total, total.new_tensor(float(x_hat.numel()))])[None]).sum(dim=0)
            mse = total / count
        per_dim = 0.5 * (torch.log(mse.clamp_min(1e-12)) + 1.0 + _LOG_2PI)
        return per_dim * (x_hat.shape[-1] if reduction == "sum" else 1.0)
    rows = x_hat.numel() // x_hat.shape[-1]
    return total / (rows if reduction == "sum" else x_hat.numel())


TERMS = ("kl", "recon", "metric_invariant", "metric_synthetic", "total")


def metric_loss(cfg: HeadsConfig, n_classes: int, generator: torch.Generator | None = None) -> MetricLoss:
    """``cfg``'s metric loss Lm, every setting given at construction: its parameters, proxies seeded by ``cfg.seed``
    (the same for a baseline and a DVML fit), the triplet losses' ``metric_reduction`` (the paper's eqs. 2 and 4
    sum over triplets), the triplet input (``triplet_input``, a fit-heads field) and ``generator`` for the loss's
    own draws. ``n_classes``: the training classes (proxy losses)."""
    return make_metric_loss(cfg.loss, num_classes=n_classes, embedding_size=cfg.embedding_size, seed=cfg.seed,
                            reducer=cfg.metric_reduction, fixed_triplets=getattr(cfg, "triplet_input", False),
                            generator=generator, **cfg.loss_params())


_DEFAULT = HeadsConfig()


class DVMLLoss(nn.Module):
    """The four-term loss; holds the metric loss (and so its proxies: ``state_dict`` is the run's "loss").

    Every default is :class:`~dvml.heads.config.HeadsConfig`'s (for its default loss, triplet), so ``DVMLLoss()``
    is the objective a default fit builds; :meth:`from_config` builds any config's.

    Args:
        metric: Lm; ``None`` = the default config's (triplet, its triplets summed).
        dvml: False = baseline: only Lm(z_I), with weight 1 (``--no-dvml``).
        reduction: ``"sum"`` (the letter of the paper's eqs. 8-9; the default config's for triplet) or
            ``"mean"``: KL over E, recon over D.
        likelihood: the reconstruction term's form, ``"l2"`` (the paper) or ``"gaussian"`` (calibrated decoder;
            :func:`recon_term`).
        free_bits: nats per dimension the KL does not charge (:func:`kl_term`); 0 = off.
        gather: set when each process holds a shard of a distributed batch (finetune under torchrun): the
            gaussian likelihood's s² is then the global batch's (:func:`recon_term`).
        target_mean, target_std: (D,) per-dimension statistics of the training features: when given, the
            reconstruction target is the standardised feature ``(x − mean) / std`` (the decoder predicts it).
        synthetic_pairs: ``within`` (the paper's eq. 10): Lm(ẑ) over each synthetic batch alone; ``cross``: the
            pairs and triplets of Lm(z_I) with each anchor real (z_I) and each positive and negative synthetic
            (ẑ_t) — the metric's ``anchors`` argument.
    """

    def __init__(self, metric: MetricLoss | None = None, dvml: bool = _DEFAULT.dvml,
                 reduction: str = _DEFAULT.reduction.value, likelihood: Likelihood | str = _DEFAULT.likelihood,
                 free_bits: float = _DEFAULT.free_bits, target_mean: torch.Tensor | None = None,
                 target_std: torch.Tensor | None = None, gather: Gather | None = None,
                 synthetic_pairs: SyntheticPairs | str = _DEFAULT.synthetic_pairs):
        super().__init__()
        self.metric = metric = metric if metric is not None else metric_loss(_DEFAULT, 0)
        self.synthetic_pairs = SyntheticPairs(synthetic_pairs)
        if self.synthetic_pairs is SyntheticPairs.cross and not metric.takes_anchors:
            raise ValueError(f"synthetic_pairs='cross' needs a loss with anchors ({CROSS_PAIR_NAMES}), got "
                             f"{type(metric).__name__}")
        self.dvml = dvml
        self.reduction = reduction
        self.likelihood = Likelihood(likelihood)
        self.gather = gather
        self.free_bits = float(free_bits)
        self.standardize = target_mean is not None
        if self.standardize:  # not persistent: recomputed from the training split by every fit (and --resume)
            self.register_buffer("target_mean", torch.as_tensor(target_mean, dtype=torch.float32), persistent=False)
            self.register_buffer("target_scale", 1.0 / torch.as_tensor(target_std, dtype=torch.float32).clamp_min(
                1e-6), persistent=False)

    @classmethod
    def from_config(cls, cfg: HeadsConfig | None = None, n_classes: int = 0, *, metric: MetricLoss | None = None,
                    generator: torch.Generator | None = None, gather: Gather | None = None,
                    target_mean: torch.Tensor | None = None, target_std: torch.Tensor | None = None) -> DVMLLoss:
        """The four-term loss of ``cfg`` (default: ``HeadsConfig()``) as a fit builds it: around ``metric`` or
        :func:`metric_loss` ``(cfg, n_classes, generator)``, with ``cfg``'s reduction, likelihood, free bits and
        synthetic pairs; ``gather``, ``target_mean``, ``target_std`` as for the class."""
        cfg = cfg if cfg is not None else _DEFAULT
        if metric is None:
            metric = metric_loss(cfg, n_classes, generator)
        return cls(metric, dvml=cfg.dvml, reduction=cfg.reduction.value, likelihood=cfg.likelihood,
                   free_bits=cfg.free_bits, target_mean=target_mean, target_std=target_std, gather=gather,
                   synthetic_pairs=cfg.synthetic_pairs)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction target of features x (B, D): x itself, or standardised."""
        return (x - self.target_mean) * self.target_scale if self.standardize else x

    def forward(self, out: HeadsOutput, x: torch.Tensor, labels: torch.Tensor,
                lam: Lambdas | None = None) -> dict[str, torch.Tensor]:
        """Terms of one batch.

        Args:
            out: the heads' output for ``x``.
            x: (B, D) features (reconstruction targets).
            labels: (B,) class ids (0..C-1 for proxy losses).
            lam: the step's weights (required with ``dvml=True``).
        Returns:
            ``{"kl", "recon", "metric_invariant", "metric_synthetic", "total"}``, scalar tensors (the first
            two and Lm(ẑ) are 0 for the baseline). Only ``total`` is meant for ``backward``.
        """
        m_inv = self.metric(out.z_i, labels)
        if not self.dvml:
            zero = m_inv.detach() * 0.0
            return {"kl": zero, "recon": zero, "metric_invariant": m_inv, "metric_synthetic": zero, "total": m_inv}
        if lam is None:
            raise ValueError("DVMLLoss needs the step's Lambdas when dvml=True")
        kl = kl_term(out.mu, out.logvar, self.reduction, self.free_bits)
        recon = recon_term(self.target(x), out.x_hat, self.reduction, self.likelihood, self.gather)
        anchors = out.z_i if self.synthetic_pairs is SyntheticPairs.cross else None
        m_syn = self.metric(out.z_syn, labels, anchors=anchors)
        total = lam.kl * kl + lam.recon * recon + lam.synthetic * m_syn + lam.invariant * m_inv
        return {"kl": kl, "recon": recon, "metric_invariant": m_inv, "metric_synthetic": m_syn, "total": total}
