"""The library's classes share the config's defaults: DVMLHeads() / DVMLLoss() are the model and objective that
fit(FitConfig(...)) builds."""

from __future__ import annotations

import pytest
import torch

from dvml.heads.config import FitConfig, HeadsConfig
from dvml.heads.model import PAPER_HEADS, DVMLHeads
from dvml.heads.objective import DVMLLoss
from dvml.heads.train import _HeadsFit
from dvml.seeding import seed_everything


def _terms(model, loss_fn, x, labels, cfg):
    eps = torch.randn((cfg.samples, len(labels), cfg.embedding_size), generator=torch.Generator().manual_seed(5))
    out = model(x, samples=cfg.samples, eps=eps, labels=labels)
    return loss_fn(out, x, labels, cfg.lambdas(cfg.phase2_epoch))


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("dvml", [True, False])
def test_fit_builds_the_library_defaults(tiny_cache, tmp_path, dvml):
    cfg = FitConfig(cache=tiny_cache, out=tmp_path / "run", dvml=dvml, eval_every=0, diag_images=0)
    run = _HeadsFit(cfg, None, None)  # what fit() trains, built but not trained
    d = run.dims[2]
    seed_everything(cfg.seed)  # as fit seeds before building the model
    heads = DVMLHeads(d, dvml=dvml)
    assert _same_state(run.model, heads)
    for name in ("variance_space", "variance_scale", "variance_kappa", "metric_grad_to_variance", "centre_mu"):
        assert getattr(run.model, name) == getattr(heads, name) == getattr(HeadsConfig(), name), name
    seed_everything(cfg.seed)
    assert _same_state(DVMLHeads.from_config(d, HeadsConfig(dvml=dvml)), heads)

    loss_fn = DVMLLoss(dvml=dvml)
    for name in ("dvml", "reduction", "likelihood", "free_bits", "synthetic_pairs"):
        assert getattr(run.loss_fn, name) == getattr(loss_fn, name), name
    assert run.loss_fn.metric.reducer == loss_fn.metric.reducer == "sum"
    x, labels = run.feats[:12, 0].float(), run.labels[:12]
    ours, theirs = _terms(run.model, run.loss_fn, x, labels, cfg), _terms(heads, loss_fn, x, labels, cfg)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert float(ours["total"].detach()) > 0


def test_the_papers_heads_differ_from_the_defaults(tiny_cache, tmp_path):
    """The control: the comparison above tells a differently built model apart."""
    cfg = FitConfig(cache=tiny_cache, out=tmp_path / "run", eval_every=0, diag_images=0)
    run = _HeadsFit(cfg, None, None)
    seed_everything(cfg.seed)
    paper = DVMLHeads(run.dims[2], **PAPER_HEADS)
    assert _same_state(run.model, paper)  # the same layers and initial weights ...
    x, labels = run.feats[:12, 0].float(), run.labels[:12]
    ours, theirs = _terms(run.model, run.loss_fn, x, labels, cfg), _terms(paper, run.loss_fn, x, labels, cfg)
    assert not torch.equal(ours["metric_synthetic"], theirs["metric_synthetic"])  # ... but another z_hat
    assert DVMLLoss(reduction="mean").reduction != run.loss_fn.reduction
