"""DVMLHeads: shapes, reparameterisation, the phase-1 gradient stop (checked with autograd), tanh placement."""

from __future__ import annotations

import pytest
import torch

from dvml.heads.config import FitConfig
from dvml.heads.model import PAPER_HEADS, DVMLHeads
from dvml.heads.objective import recon_term

D, E, H, T, B = 12, 6, 8, 5, 4


def _heads(seed=0, dvml=True):
    torch.manual_seed(seed)
    return DVMLHeads(D, E, H, dvml=dvml, **PAPER_HEADS).double()


def _x(seed=1, requires_grad=False):
    x = torch.rand(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    return x.requires_grad_(requires_grad)


def _grad_norms(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: (0.0 if p.grad is None else float(p.grad.abs().sum())) for n, p in model.named_parameters()}


def test_shapes_and_baseline():
    out = _heads()(_x(), samples=T)
    assert out.z_i.shape == (B, E) and out.mu.shape == (B, E) and out.logvar.shape == (B, E)
    assert out.z_syn.shape == (T, B, E) and out.x_hat.shape == (T, B, D)
    base = _heads(dvml=False)
    assert {n for n, _ in base.named_parameters()} == {"embedding.weight", "embedding.bias"}
    assert base(_x(), samples=T)[1:] == (None, None, None, None)


def test_same_seed_same_embedding_layer_with_and_without_dvml():
    torch.testing.assert_close(_heads(dvml=True).embedding.weight, _heads(dvml=False).embedding.weight)


def test_synthetic_embeddings_are_reparameterised_draws():
    model, x = _heads(), _x()
    eps = torch.randn(T, B, E, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = model(x, eps=eps)
    z_i, mu, logvar = model.embedding(x), model.mu(x), model.logvar(x)
    torch.testing.assert_close(out.z_syn, z_i + mu + torch.exp(0.5 * logvar) * eps)
    torch.testing.assert_close(out.x_hat, model.decoder.out(torch.tanh(model.decoder.hidden(out.z_syn))))


def test_draws_come_from_the_generator():
    model, x = _heads(), _x()
    a = model(x, samples=T, generator=torch.Generator().manual_seed(7)).z_syn
    b = model(x, samples=T, generator=torch.Generator().manual_seed(7)).z_syn
    c = model(x, samples=T, generator=torch.Generator().manual_seed(8)).z_syn
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # T distinct draws, not one repeated


@pytest.mark.parametrize("stop", [True, False])
def test_reparameterised_gradient_reaches_mu_and_sigma_via_metric_and_recon(stop):
    """Deviation 1 of public reimplementations: z_V drawn without reparameterisation (μ, σ learn from KL only)."""
    model, x = _heads(), _x()
    out = model(x, samples=T, stop_recon_grad=stop)
    synthetic_metric_like = out.z_syn.square().sum()  # any function of ẑ: the metric term's path
    for loss in (synthetic_metric_like, recon_term(x, out.x_hat)):
        g = _grad_norms(model, loss)
        assert g["mu.weight"] > 0 and g["logvar.weight"] > 0


def test_phase1_reconstruction_gradient_does_not_reach_the_embedding_layer():
    model, x = _heads(), _x()
    out = model(x, samples=T, stop_recon_grad=True)
    g = _grad_norms(model, recon_term(x, out.x_hat))
    assert g["embedding.weight"] == 0.0 and g["embedding.bias"] == 0.0
    # ... but it trains the decoder and the variance branch
    assert g["decoder.hidden.weight"] > 0 and g["decoder.out.weight"] > 0 and g["mu.weight"] > 0


def test_phase2_reconstruction_gradient_reaches_the_embedding_layer():
    model, x = _heads(), _x()
    out = model(x, samples=T, stop_recon_grad=False)
    g = _grad_norms(model, recon_term(x, out.x_hat))
    assert g["embedding.weight"] > 0 and g["embedding.bias"] > 0


def test_phase1_metric_gradient_still_reaches_the_embedding_layer():
    model, x = _heads(), _x()
    out = model(x, samples=T, stop_recon_grad=True)
    g = _grad_norms(model, out.z_syn.square().sum())
    assert g["embedding.weight"] > 0


def test_phase1_stop_also_shields_a_trainable_backbone():
    """With a backbone below the heads (x requires grad), phase-1 reconstruction sends nothing into x."""
    eps = torch.randn(T, B, E, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = _heads()
    grads = {}
    for stop in (True, False):
        x = _x(requires_grad=True)
        out = model(x, eps=eps, stop_recon_grad=stop)
        recon_term(x.detach(), out.x_hat).backward()
        grads[stop] = 0.0 if x.grad is None else x.grad.abs().sum().item()
        grads[f"values{stop}"] = out.x_hat.detach()
    assert grads[True] == 0.0 and grads[False] > 0
    torch.testing.assert_close(grads["valuesTrue"], grads["valuesFalse"])  # the stop changes gradients, not values


def test_phase_schedule_stops_in_phase_1_and_releases_in_phase_2():
    cfg = FitConfig(cache="c.h5", out="r", phase2_epoch=3)
    assert cfg.lambdas(2.9).stop_recon_grad and not cfg.lambdas(3.0).stop_recon_grad


def test_embed_is_z_i_only():
    model, x = _heads(), _x()
    torch.testing.assert_close(model.embed(x), model(x, samples=T).z_i)
    torch.testing.assert_close(model.embed(x), x @ model.embedding.weight.T + model.embedding.bias)


def test_decoder_output_is_linear_so_targets_above_one_are_reachable():
    """The tanh sits on the hidden layer: a pooled-feature target with entries > 1 can be reconstructed."""
    torch.manual_seed(0)
    model = DVMLHeads(D, E, H, **PAPER_HEADS)
    target = torch.full((B, D), 3.0)
    opt = torch.optim.Adam(model.decoder.parameters(), lr=0.05)
    z = torch.randn(B, E)
    for _ in range(300):
        opt.zero_grad()
        loss = recon_term(target, model.decoder(z))
        loss.backward()
        opt.step()
    assert loss.item() < 1e-2 and model.decoder(z).max().item() > 2.9
