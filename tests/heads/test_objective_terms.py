"""KL and reconstruction terms against independent references."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from dvml.heads.objective import kl_term, recon_term


def test_kl_against_torch_distributions_kl_divergence():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(7, 5, generator=g, dtype=torch.float64)
    logvar = torch.randn(7, 5, generator=g, dtype=torch.float64)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu)))
    torch.testing.assert_close(kl_term(mu, logvar), ref.sum(dim=1).mean())
    torch.testing.assert_close(kl_term(mu, logvar, "mean"), ref.mean())


def test_kl_is_zero_at_the_prior():
    assert kl_term(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0


def test_recon_against_hand_computed_loop():
    g = torch.Generator().manual_seed(1)
    t, b, d = 3, 4, 5
    x = torch.rand(b, d, generator=g, dtype=torch.float64) * 3  # non-negative, above 1 like pooled features
    x_hat = torch.randn(t, b, d, generator=g, dtype=torch.float64)
    total = 0.0
    for i in range(b):
        for s in range(t):
            total += sum((float(x[i, j]) - float(x_hat[s, i, j])) ** 2 for j in range(d))
    assert recon_term(x, x_hat).item() == pytest.approx(total / (t * b), rel=1e-12)
    assert recon_term(x, x_hat, "mean").item() == pytest.approx(total / (t * b * d), rel=1e-12)


def test_unknown_reduction_is_an_error():
    with pytest.raises(ValueError, match="reduction"):
        recon_term(torch.zeros(2, 3), torch.zeros(1, 2, 3), "max")
