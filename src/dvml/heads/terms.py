"""The two variational terms of the DVML objective as pure functions (paper eqs. 8 and 9).

Both are per-image quantities averaged over the batch (and over the T draws for the reconstruction), so
their scale does not depend on the batch size or T; both are summed over their vector dimension, as in the
paper's formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
