"""The issue-14 options of the DVML objective against independent references: calibrated (Gaussian)
reconstruction, free bits, summed triplet losses (paper eqs. 2 and 4), the triplet input, z_V at the class scale."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from dvml.heads.model import PAPER_HEADS, DVMLHeads
from dvml.heads.objective import kl_term, recon_term
from dvml.heads.triplet_input import TripletInputSampler
from dvml.losses.metric import BatchedTripletLoss, pml_reference


def test_gaussian_recon_is_the_nll_at_the_ml_variance():
    """(D/2)(log mse + 1 + log 2π) = Σ_d −log N(x_d; x̂_d, mse) per row, averaged (torch GaussianNLLLoss, full)."""
    g = torch.Generator().manual_seed(0)
    t, b, d = 3, 5, 7
    x = torch.rand(b, d, generator=g, dtype=torch.float64) * 4
    x_hat = torch.randn(t, b, d, generator=g, dtype=torch.float64)
    mse = ((x_hat - x) ** 2).mean()
    ref = torch.nn.GaussianNLLLoss(full=True, reduction="sum")(x_hat, x.expand_as(x_hat), mse.expand_as(x_hat))
    torch.testing.assert_close(recon_term(x, x_hat, "sum", "gaussian"), ref / (t * b))
    torch.testing.assert_close(recon_term(x, x_hat, "mean", "gaussian"), ref / (t * b * d))


def test_gaussian_recon_does_not_depend_on_the_features_units():
    """Scaling x and x̂ by a shifts the value by D·log a and leaves the gradient direction unchanged."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 6, generator=g, dtype=torch.float64)
    xh = torch.randn(2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    xh2 = (xh.detach() * 30.0).requires_grad_(True)
    a, b = recon_term(x, xh, "sum", "gaussian"), recon_term(30.0 * x, xh2, "sum", "gaussian")
    assert b.item() == pytest.approx(a.item() + 6 * math.log(30.0), rel=1e-12)
    a.backward()
    b.backward()
    torch.testing.assert_close(xh2.grad * 30.0, xh.grad)


def test_free_bits_against_a_loop():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(9, 5, generator=g, dtype=torch.float64) * torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0],
                                                                             dtype=torch.float64)
    logvar = torch.randn(9, 5, generator=g, dtype=torch.float64) * 0.1
    kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0))  # (9, 5)
    want = sum(max(0.25, float(kl[:, j].mean())) for j in range(5))
    assert kl_term(mu, logvar, "sum", free_bits=0.25).item() == pytest.approx(want, rel=1e-12)
    assert kl_term(mu, logvar, "mean", free_bits=0.25).item() == pytest.approx(want / 5, rel=1e-12)
    torch.testing.assert_close(kl_term(mu, logvar, "sum", free_bits=0.0), kl.sum(1).mean())


def _batch(seed=0, c=5, m=4, t=3, e=8):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(c).repeat_interleave(m)[torch.randperm(c * m, generator=g)]
    return torch.randn(t, c * m, e, generator=g, dtype=torch.float64), labels


@pytest.mark.parametrize("squared", [True, False])
def test_summed_triplet_loss_against_pml_sum_reducer(squared):
    """Paper eqs. 2 / 4: the sum over every triplet = pml TripletMarginLoss with a SumReducer, mean over t."""
    from pytorch_metric_learning import distances, losses, reducers

    z, labels = _batch()
    ours = BatchedTripletLoss(margin=0.2, squared=squared, reducer="sum")
    ref = losses.TripletMarginLoss(margin=0.2, distance=distances.LpDistance(power=2 if squared else 1),
                                   reducer=reducers.SumReducer())
    want = sum(ref(z[t], labels) for t in range(z.shape[0])) / z.shape[0]
    torch.testing.assert_close(ours(z, labels), want)


def test_summed_dws_against_pml_on_the_drawn_triplets():
    from pytorch_metric_learning import distances, losses, reducers

    z, labels = _batch(seed=3, t=2)
    ours = BatchedTripletLoss(margin=0.2, squared=False, dws=True, reducer="sum")
    ours.generator = torch.Generator().manual_seed(0)
    got = ours(z, labels)
    from dvml.losses.metric import _pair_distances

    ours.generator = torch.Generator().manual_seed(0)
    a, p, n, valid = ours.sample_negatives(_pair_distances(z, False), labels, z.shape[-1])
    ref = losses.TripletMarginLoss(margin=0.2, distance=distances.LpDistance(power=1), reducer=reducers.SumReducer())
    want = 0.0
    for t in range(z.shape[0]):
        keep = valid[t]
        want = want + ref(z[t], labels, (a[keep], p[keep], n[t][keep]))
    torch.testing.assert_close(got, want / z.shape[0])


@pytest.mark.parametrize("reducer", ["sum", "nonzero"])
def test_triplet_input_against_pml_with_the_given_triplets(reducer):
    """The triplet input's batch [a; p; n] = pml TripletMarginLoss on exactly those K triplets."""
    from pytorch_metric_learning import distances, losses, reducers

    g = torch.Generator().manual_seed(4)
    k, e = 6, 8
    z = torch.randn(2, 3 * k, e, generator=g, dtype=torch.float64)
    labels = torch.cat([torch.arange(k), torch.arange(k), torch.arange(k) + 100])
    ours = BatchedTripletLoss(margin=0.3, squared=True, reducer=reducer, fixed_triplets=True)
    red = reducers.SumReducer() if reducer == "sum" else reducers.AvgNonZeroReducer()
    ref = losses.TripletMarginLoss(margin=0.3, distance=distances.LpDistance(power=2), reducer=red)
    idx = (torch.arange(k), torch.arange(k) + k, torch.arange(k) + 2 * k)
    want = (ref(z[0], labels, idx) + ref(z[1], labels, idx)) / 2
    torch.testing.assert_close(ours(z, labels), want)


def test_triplet_loss_default_reducer_unchanged():
    z, labels = _batch(seed=5)
    ref, _ = pml_reference("triplet", num_classes=5, embedding_size=8)
    want = sum(ref(z[t], labels) for t in range(z.shape[0])) / z.shape[0]
    torch.testing.assert_close(BatchedTripletLoss(margin=0.2)(z, labels), want)


def test_triplet_input_sampler_forms_valid_triplets():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 7 + [3] * 1 + [4] * 3)
    s = TripletInputSampler(labels, 12, g)
    batches = s.epoch()
    assert batches.shape == (len(labels) // 12, 12)
    for b in batches:
        a, p, n = b[:4], b[4:8], b[8:]
        assert bool((labels[a] == labels[p]).all()) and bool((a != p).all())
        assert bool((labels[n] != labels[a]).all())
    g2 = torch.Generator().manual_seed(0)
    torch.testing.assert_close(TripletInputSampler(labels, 12, g2).epoch(), batches)


def test_triplet_input_sampler_covers_every_pair_choice():
    """Anchors, positives and negatives spread over all eligible classes and images."""
    labels = torch.tensor([0] * 3 + [1] * 3 + [2] * 1)
    s = TripletInputSampler(labels, 3 * 300, torch.Generator().manual_seed(1))
    s.n_batches = 1
    b = s.epoch()[0]
    a, p, n = b[:300], b[300:600], b[600:]
    assert set(labels[a].tolist()) == {0, 1}  # class 2 has one image: never an anchor
    assert set(a.tolist()) == set(range(6)) and set(p.tolist()) == set(range(6))
    assert set(n.tolist()) == set(range(7))


def test_class_scale_is_the_pooled_within_class_std():
    torch.manual_seed(0)
    model = DVMLHeads(6, 4, 8, variance_space="normalized", variance_scale="class", variance_kappa=0.7).double()
    x = torch.randn(12, 6, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3])
    eps = torch.randn(2, 12, 4, dtype=torch.float64)
    out = model(x, eps=eps, labels=y)
    u = torch.nn.functional.normalize(model.embedding(x), dim=-1).detach().numpy()
    yy = y.numpy()
    ss = sum(((u[yy == c] - u[yy == c].mean(0)) ** 2).sum() for c in np.unique(yy))
    s = 0.7 * math.sqrt(ss / ((12 - 4) * 4))
    z_v = model.mu(x) + (0.5 * model.logvar(x)).exp() * eps
    torch.testing.assert_close(out.z_syn, torch.as_tensor(u) + s * z_v)
    with pytest.raises(ValueError, match="labels"):
        model(x, eps=eps)


def test_unit_scale_raw_space_is_the_paper():
    torch.manual_seed(0)
    model = DVMLHeads(6, 4, 8, **PAPER_HEADS).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    eps = torch.randn(2, 5, 4, dtype=torch.float64)
    out = model(x, eps=eps)
    torch.testing.assert_close(out.z_syn, model.embedding(x) + model.mu(x) + (0.5 * model.logvar(x)).exp() * eps)


def test_metric_grad_to_variance_off_keeps_lm_zhat_off_mu_sigma():
    """Lm(ẑ) then reaches the embedding layer but not μ / log σ²; the reconstruction still reaches them."""
    torch.manual_seed(0)
    x = torch.randn(8, 6, dtype=torch.float64)
    eps = torch.randn(2, 8, 4, dtype=torch.float64)
    for flag in (True, False):
        model = DVMLHeads(6, 4, 8, **{**PAPER_HEADS, "metric_grad_to_variance": flag}).double()
        out = model(x, eps=eps)
        out.z_syn.square().sum().backward(retain_graph=True)
        assert model.embedding.weight.grad.abs().sum() > 0
        assert (model.mu.weight.grad is not None and model.mu.weight.grad.abs().sum() > 0) == flag
        model.zero_grad()
        out.x_hat.square().sum().backward()
        assert model.mu.weight.grad.abs().sum() > 0 and model.logvar.weight.grad.abs().sum() > 0
        torch.testing.assert_close(out.z_syn, model.embedding(x) + model.mu(x) + (0.5 * model.logvar(x)).exp() * eps)


def test_centre_mu_subtracts_the_batch_class_mean():
    torch.manual_seed(0)
    model = DVMLHeads(6, 4, 8, centre_mu=True, **PAPER_HEADS).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    y = torch.tensor([3, 3, 5, 5, 5, 9, 3])
    eps = torch.randn(2, 7, 4, dtype=torch.float64)
    out = model(x, eps=eps, labels=y)
    mu = model.mu(x).detach().numpy()
    want = mu.copy()
    for c in (3, 5, 9):
        want[y.numpy() == c] -= mu[y.numpy() == c].mean(0)
    torch.testing.assert_close(out.mu, torch.as_tensor(want))
    assert float(out.mu[5].detach().abs().max()) == 0.0  # a class seen once
    torch.testing.assert_close(out.z_syn, model.embedding(x) + out.mu + (0.5 * model.logvar(x)).exp() * eps)
    with pytest.raises(ValueError, match="labels"):
        model(x, eps=eps)


@pytest.mark.parametrize("squared", [True, False])
def test_plain_mean_triplet_loss_against_pml_mean_reducer(squared):
    from pytorch_metric_learning import distances, losses, reducers

    z, labels = _batch(seed=6)
    ours = BatchedTripletLoss(margin=0.2, squared=squared, reducer="mean")
    ref = losses.TripletMarginLoss(margin=0.2, distance=distances.LpDistance(power=2 if squared else 1),
                                   reducer=reducers.MeanReducer())
    want = sum(ref(z[t], labels) for t in range(z.shape[0])) / z.shape[0]
    torch.testing.assert_close(ours(z, labels), want)
