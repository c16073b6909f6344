"""The learned-vs-noise checks (dvml.experiments.branch_report, dvml.heads.diagnostics): each measure against a
brute-force reference, and the checks pass where the learned draws are informative and FAIL once the encoder is
replaced by isotropic noise — for a hand-built encoder on a world whose within-class variation lives in a known
subspace, and for a trained run whose encoder is swapped for the prior."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dvml import runs as R
from dvml.experiments import branch_report as BR
from dvml.heads import diagnostics as D
from dvml.heads.config import HeadsConfig
from dvml.heads.core import metric_loss
from dvml.heads.model import DVMLHeads

VS_NOISE = ("consistency_vs_noise", "hardness_vs_noise", "grad_vs_noise")


def test_loo_consistency_matches_a_loop_with_the_source_left_out():
    rng = np.random.default_rng(0)
    u = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(30, 5))), dim=1)
    y = torch.from_numpy(np.repeat(np.arange(6), 5))
    y[-1] = 6  # a class of one image: its points are not counted
    pts = torch.nn.functional.normalize(u.repeat(2, 1) + 0.4 * torch.from_numpy(rng.normal(size=(60, 5))), dim=1)
    src = torch.arange(30).repeat(2)
    hits = total = 0
    for p, s in zip(pts.numpy(), src.numpy(), strict=True):
        own = int(y[s])
        members = [i for i in range(30) if int(y[i]) == own and i != s]
        if not members:
            continue
        d = {c: np.sum((p - u.numpy()[[i for i in range(30) if int(y[i]) == c]].mean(0)) ** 2)
             for c in set(y.tolist()) if c != own}
        d_own = np.sum((p - u.numpy()[members].mean(0)) ** 2)
        hits += d_own < min(d.values())
        total += 1
    assert D.loo_consistency(pts, src, u, y, chunk=7) == pytest.approx(hits / total)
    # the image itself against leave-one-out centres differs from centres that contain it (the old measure)
    classes, inv = torch.unique(y, return_inverse=True)
    centres = torch.stack([u[inv == k].mean(0) for k in range(len(classes))])
    inside = D.nearest_centre_share(u, y, centres, classes)
    assert D.loo_consistency(u, torch.arange(30), u, y) < inside


def test_triplet_hardness_matches_a_loop_over_triplets():
    rng = np.random.default_rng(1)
    z = torch.from_numpy(rng.normal(size=(2, 12, 4)))
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    batches = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    vals = []
    u = torch.nn.functional.normalize(z, dim=-1).numpy()
    for t, b in itertools.product(range(2), batches.tolist()):
        for a, p, n in itertools.permutations(b, 3):
            if y[a] == y[p] and y[n] != y[a]:
                d_ap, d_an = np.sum((u[t, a] - u[t, p]) ** 2), np.sum((u[t, a] - u[t, n]) ** 2)
                vals.append(max(0.0, d_ap - d_an + 0.3))
    vals = np.asarray(vals)
    h = D.triplet_hardness(z, y, batches, 0.3)
    assert h["per_active"] == pytest.approx(vals[vals > 0].mean() / 0.3)
    assert h["active"] == pytest.approx(np.mean(vals > 0))


def test_norm_matched_noise_keeps_each_displacement_norm_and_randomises_its_direction():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 8, generator=g)
    z = base + torch.randn(3, 50, 8, generator=g) * torch.linspace(0.1, 3, 8)
    n = D.norm_matched_noise(z, base, g)
    torch.testing.assert_close((n - base).norm(dim=-1), (z - base).norm(dim=-1))
    cos = torch.nn.functional.cosine_similarity(n - base, z - base, dim=-1)
    assert cos.abs().mean() < 0.5


def _world(seed=0, classes=24, per=30):
    """x = class centre in dims 0-7 + within-class variation in dims 8-15 (the variation carries no class)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 8))
    x = np.concatenate([np.repeat(centres, per, 0), 0.6 * rng.normal(size=(classes * per, 8))], 1)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(np.repeat(np.arange(classes), per))


def _hand_built(informative: bool) -> tuple[DVMLHeads, HeadsConfig]:
    cfg = HeadsConfig(embedding_size=16, decoder_hidden=8, samples=4, epochs=2, phase2_epoch=1, batch_size=40,
                      variance_space="raw", variance_scale="unit")
    model = DVMLHeads(16, **cfg.heads_kwargs())
    with torch.no_grad():
        model.embedding.weight.copy_(torch.eye(16))
        model.embedding.bias.zero_()
        for layer in (model.mu, model.logvar):
            layer.weight.zero_()
            layer.bias.zero_()
        # informative: σ² = 1 along the variation's dimensions, ~0 along the class's; else isotropic with the same
        # expected ‖z_V‖² (0.5 everywhere): an encoder that is noise
        model.logvar.bias.copy_(torch.cat([torch.full((8,), -9.0), torch.zeros(8)]) if informative
                                else torch.full((16,), float(np.log(0.5))))
    return model, cfg


def test_checks_pass_for_an_informative_encoder_and_fail_for_one_that_is_noise():
    x, y = _world()
    reports = {}
    for informative in (True, False):
        model, cfg = _hand_built(informative)
        cmp = BR.noise_comparison(model, x, y, cfg, samples=8, seed=0, metric=metric_loss(cfg, 24))
        reports[informative] = BR.checks_from({"active_frac": 1.0, "kl_sum": 5.0}, cmp), cmp
    good, cmp = reports[True]
    # draws along the class-free variation stay in their class far more than noise of their size
    assert good["consistency_vs_noise"]["ok"] and cmp["consistency"]["learned"] > cmp["consistency"]["noise"] + 0.1
    bad, _ = reports[False]
    for key in VS_NOISE:
        assert bad[key]["ok"] is False, (key, bad[key])
    assert bad["active_frac"]["ok"]  # the absolute checks cannot tell: they pass for the noise encoder


def test_a_trained_run_whose_encoder_is_swapped_for_noise_fails_the_checks(tmp_path):
    from dvml.extract.synth import SynthConfig, generate
    from dvml.heads import FitConfig, fit

    cache = generate(SynthConfig(n_classes=24, images_per_class=20, views=2, feature_dim=32, class_dim=16,
                                 variation_dim=4, hidden_dim=32), tmp_path / "w.h5")
    run = fit(FitConfig(cache=cache, out=tmp_path / "run", epochs=4, phase2_epoch=2, kl_warmup_epochs=2,
                        embedding_size=16, decoder_hidden=16, samples=4, batch_size=24, lr=3e-3, eval_every=0,
                        device="cpu"))
    trained = BR.run_report(run)
    assert set(trained["checks"]) == {c[0] for c in BR.CHECKS} and trained["vs_noise"]["grad"]["batches"] >= 1
    g = trained["vs_noise"]["grad"]
    assert trained["checks"]["grad_vs_noise"]["value"] == min(h["cos_noise"] - h["cos_learned"] for h in g["halves"])
    ckpt = R.load_checkpoint(run)
    for k in ("mu.weight", "mu.bias", "logvar.weight", "logvar.bias"):  # q(z_V|x) = N(0, I): the encoder is noise
        ckpt["model"][k].zero_()
    torch.save(ckpt, run / R.HEADS_FILE)
    swapped = BR.run_report(run)
    for key in VS_NOISE:
        assert swapped["checks"][key]["ok"] is False, (key, swapped["checks"][key])
    assert swapped["checks"]["active_frac"]["ok"] is False  # and the posterior is the prior: nothing active
    assert {k: v["value"] for k, v in swapped["checks"].items()} != {k: v["value"] for k, v in
                                                                      trained["checks"].items()}


def test_pair_hardness_matches_a_loop_over_npair_comparisons():
    rng = np.random.default_rng(2)
    z = torch.from_numpy(rng.normal(size=(2, 8, 3)))
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    batches = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    vals = []
    for t, b in itertools.product(range(2), batches.tolist()):
        zt = z[t].numpy()
        for a, p, n in itertools.permutations(b, 3):
            if y[a] == y[p] and y[n] != y[a]:
                vals.append(max(0.0, zt[a] @ zt[n] - zt[a] @ zt[p]))  # raw dot products: N-pair's logits
    vals = np.asarray(vals)
    h = D.pair_hardness(z, y, batches)
    assert h["per_active"] == pytest.approx(vals[vals > 0].mean())
    assert h["active"] == pytest.approx(np.mean(vals > 0))
    assert D.pair_hardness(3 * z, y, batches)["per_active"] == pytest.approx(9 * h["per_active"])  # not normalised


def test_an_npair_run_reports_its_own_comparisons_and_its_noise_swap_fails(tmp_path):
    """An N-pair DVML run's hardness is measured on N-pair's comparisons (logits); with its encoder swapped for the
    prior the draws are noise and the learned-vs-noise hardness check fails."""
    from dvml.extract.synth import SynthConfig, generate
    from dvml.heads import FitConfig, fit

    cache = generate(SynthConfig(n_classes=24, images_per_class=20, views=2, feature_dim=32, class_dim=16,
                                 variation_dim=4, hidden_dim=32), tmp_path / "w.h5")
    run = fit(FitConfig(cache=cache, out=tmp_path / "run", loss="npair", epochs=4, phase2_epoch=2,
                        kl_warmup_epochs=2, embedding_size=16, decoder_hidden=16, samples=4, batch_size=24, lr=3e-3,
                        eval_every=0, device="cpu"))
    trained = BR.run_report(run)
    assert trained["vs_noise"]["hardness"]["unit"] == "logits"
    ckpt = R.load_checkpoint(run)
    for k in ("mu.weight", "mu.bias", "logvar.weight", "logvar.bias"):
        ckpt["model"][k].zero_()
    torch.save(ckpt, run / R.HEADS_FILE)
    swapped = BR.run_report(run)
    assert swapped["vs_noise"]["hardness"]["unit"] == "logits"
    assert swapped["checks"]["hardness_vs_noise"]["ok"] is False, swapped["checks"]["hardness_vs_noise"]
    assert swapped["checks"]["consistency_vs_noise"]["ok"] is False
