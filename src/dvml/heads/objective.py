"""The DVML objective (paper eq. 12): the two variational terms and one module returning every named term.

``L = λ1·KL + λ2·recon + λ3·Lm(ẑ) + λ4·Lm(z_I)`` with KL and recon (:func:`kl_term`, :func:`recon_term`, paper
eqs. 8 and 9: per-image quantities averaged over the batch and the T draws, summed over their vector
dimension unless ``reduction="mean"``) and Lm a
:class:`~dvml.losses.metric.MetricLoss`: Lm(ẑ) is the metric loss of each of the T synthetic batches
(labels of their source images), averaged over T. The baseline (``dvml=False``) is ``L = Lm(z_I)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dvml.heads.config import Lambdas
from dvml.heads.model import HeadsOutput
from dvml.losses.metric import MetricLoss


def _reduce(per_dim: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_dim.sum(dim=-1).mean()
    if reduction == "mean":
        return per_dim.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def kl_term(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """KL(N(μ, σ²I) ‖ N(0, I)) summed over the E dimensions, averaged over the batch (paper eq. 8).

    ``0.5 · Σ_j (σ_j² + μ_j² − 1 − log σ_j²)``, mean over rows.

    Args:
        mu: (B, E) means.
        logvar: (B, E) log variances log σ².
        reduction: ``"sum"`` over E (the paper) or ``"mean"`` over E (the same divided by E).
    Returns:
        scalar tensor.
    """
    return _reduce(0.5 * (logvar.exp() + mu.square() - 1.0 - logvar), reduction)


def recon_term(x: torch.Tensor, x_hat: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Squared reconstruction error ‖x − x̂‖² summed over D, averaged over the T draws and B images (eq. 9).

    Args:
        x: (B, D) targets (the cached backbone features).
        x_hat: (T, B, D) reconstructions of the T synthetic embeddings of each image (or (B, D)).
        reduction: ``"sum"`` over D (the paper) or ``"mean"`` over D (the same divided by D).
    Returns:
        scalar tensor: ``(1 / (T·B)) Σ_i Σ_t ‖x_i − x̂_{i,t}‖²`` (divided by D for ``"mean"``).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    # one fused kernel (forward and backward) over the (T, B, D) draws instead of sub/square/sum passes
    total = F.mse_loss(x_hat, x.expand_as(x_hat), reduction="sum")
    rows = x_hat.numel() // x_hat.shape[-1]
    return total / (rows if reduction == "sum" else x_hat.numel())


TERMS = ("kl", "recon", "metric_invariant", "metric_synthetic", "total")


class DVMLLoss(nn.Module):
    """The four-term loss; holds the metric loss (and so its proxies: ``state_dict`` is the run's "loss").

    Args:
        metric: Lm.
        dvml: False = baseline: only Lm(z_I), with weight 1 (``--no-dvml``).
        reduction: ``"mean"`` (default) or ``"sum"`` (the letter of the paper's eqs. 8-9): KL over E, recon over D.
    """

    def __init__(self, metric: MetricLoss, dvml: bool = True, reduction: str = "mean"):
        super().__init__()
        self.metric = metric
        self.dvml = dvml
        self.reduction = reduction

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
        kl = kl_term(out.mu, out.logvar, self.reduction)
        recon = recon_term(x, out.x_hat, self.reduction)
        m_syn = self.metric(out.z_syn, labels)
        total = lam.kl * kl + lam.recon * recon + lam.synthetic * m_syn + lam.invariant * m_inv
        return {"kl": kl, "recon": recon, "metric_invariant": m_inv, "metric_synthetic": m_syn, "total": total}
