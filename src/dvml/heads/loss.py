"""The DVML objective (paper eq. 12) as one module returning its named terms.

``L = λ1·KL + λ2·recon + λ3·Lm(ẑ) + λ4·Lm(z_I)`` with KL and recon from :mod:`dvml.heads.terms` and Lm a
:class:`~dvml.heads.metric_losses.MetricLoss`: Lm(ẑ) is the metric loss of each of the T synthetic batches
(labels of their source images), averaged over T. The baseline (``dvml=False``) is ``L = Lm(z_I)``.
"""

from __future__ import annotations

import torch
from torch import nn

from dvml.heads.config import Lambdas
from dvml.heads.metric_losses import MetricLoss
from dvml.heads.model import HeadsOutput
from dvml.heads.terms import kl_term, recon_term

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
