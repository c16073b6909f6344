"""DVMLLoss: named terms, the weighted total, and all T draws entering Lm(ẑ)."""

from __future__ import annotations

import torch

from dvml.heads.config import FitConfig
from dvml.heads.model import PAPER_HEADS, DVMLHeads
from dvml.heads.objective import TERMS, DVMLLoss, kl_term, recon_term
from dvml.losses.metric import make_metric_loss

D, E, T = 10, 6, 5


def _setup(dvml=True, loss="triplet", seed=0):
    torch.manual_seed(seed)
    model = DVMLHeads(D, E, 8, dvml=dvml, **PAPER_HEADS).double()
    metric = make_metric_loss(loss, num_classes=3, embedding_size=E).double()
    labels = torch.arange(3).repeat_interleave(4)
    x = torch.rand(len(labels), D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2
    return model, DVMLLoss(metric, dvml=dvml, reduction="mean", likelihood="l2"), metric, x, labels


def test_terms_and_weighted_total():
    model, loss_fn, metric, x, labels = _setup()
    lam = FitConfig(cache="c", out="o", kl_warmup_epochs=0).lambdas(0)
    out = model(x, samples=T, generator=torch.Generator().manual_seed(1))
    terms = loss_fn(out, x, labels, lam)
    assert tuple(terms) == TERMS
    torch.testing.assert_close(terms["kl"], kl_term(out.mu, out.logvar, "mean"))
    torch.testing.assert_close(terms["recon"], recon_term(x, out.x_hat, "mean"))
    torch.testing.assert_close(terms["metric_invariant"], metric(out.z_i, labels))
    expected = lam.kl * terms["kl"] + lam.recon * terms["recon"] + lam.synthetic * terms["metric_synthetic"] \
        + lam.invariant * terms["metric_invariant"]
    torch.testing.assert_close(terms["total"], expected)


def test_all_t_draws_enter_the_synthetic_metric_loss_averaged_over_t():
    """Deviation 2 of public reimplementations: only one of the T draws in the synthetic metric loss."""
    model, loss_fn, metric, x, labels = _setup()
    out = model(x, samples=T, generator=torch.Generator().manual_seed(2))
    out.z_syn.retain_grad()
    terms = loss_fn(out, x, labels, FitConfig(cache="c", out="o").lambdas(0))
    per_t = torch.stack([metric(out.z_syn[t], labels) for t in range(T)])
    torch.testing.assert_close(terms["metric_synthetic"], per_t.mean())
    assert len(set(per_t.tolist())) == T  # the draws differ
    terms["metric_synthetic"].backward()
    assert all(out.z_syn.grad[t].abs().sum() > 0 for t in range(T))


def test_baseline_is_the_metric_loss_of_z_i_alone():
    model, loss_fn, metric, x, labels = _setup(dvml=False)
    out = model(x)
    terms = loss_fn(out, x, labels)
    torch.testing.assert_close(terms["total"], metric(out.z_i, labels))
    assert terms["kl"].item() == terms["recon"].item() == terms["metric_synthetic"].item() == 0.0


def test_sum_reduction_is_the_papers_formula():
    model, _, metric, x, labels = _setup()
    loss_fn = DVMLLoss(metric, reduction="sum", likelihood="l2")
    out = model(x, samples=T, generator=torch.Generator().manual_seed(3))
    terms = loss_fn(out, x, labels, FitConfig(cache="c", out="o").lambdas(40))
    torch.testing.assert_close(terms["recon"], recon_term(x, out.x_hat, "sum"))
    torch.testing.assert_close(terms["kl"], kl_term(out.mu, out.logvar, "sum"))


def test_cross_synthetic_pairs_anchor_on_z_i():
    """--synthetic-pairs cross: Lm(ẑ) is the metric loss of each synthetic batch against z_I as anchors, so its
    gradient reaches z_I directly (not only through ẑ); a loss without anchors is refused."""
    import pytest

    for loss in ("triplet", "npair"):
        model, _, metric, x, labels = _setup(loss=loss)
        if loss == "npair":
            labels = torch.arange(6).repeat_interleave(2)
        cross = DVMLLoss(metric, synthetic_pairs="cross", reduction="mean", likelihood="l2")
        within = DVMLLoss(metric, reduction="mean", likelihood="l2")
        out = model(x, samples=T, generator=torch.Generator().manual_seed(3))
        lam = FitConfig(cache="c", out="o").lambdas(0)
        got = cross(out, x, labels, lam)["metric_synthetic"]
        torch.testing.assert_close(got, metric(out.z_syn, labels, anchors=out.z_i))
        assert not torch.isclose(got, within(out, x, labels, lam)["metric_synthetic"])
        (g_anchor,) = torch.autograd.grad(got, out.z_i, retain_graph=True)
        assert g_anchor.abs().sum() > 0
    with pytest.raises(ValueError, match="synthetic_pairs='cross' needs a loss with anchors"):
        DVMLLoss(make_metric_loss("proxy-nca-pp", num_classes=3, embedding_size=E), synthetic_pairs="cross")
