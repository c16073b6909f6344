"""Diagnostics of the variational branch against direct (loop / numpy) computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dvml.heads import diagnostics as diag
from dvml.heads.config import Lambdas
from dvml.heads.model import PAPER_HEADS, DVMLHeads
from dvml.heads.objective import DVMLLoss
from dvml.losses.metric import make_metric_loss


def _data(n=40, e=6, c=5, t=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(c).repeat_interleave(n // c)[torch.randperm(n, generator=g)]
    z_i = torch.randn(n, e, generator=g, dtype=torch.float64) + 2 * torch.randn(c, e, generator=g,
                                                                                 dtype=torch.float64)[labels]
    mu = torch.randn(n, e, generator=g, dtype=torch.float64) * torch.tensor([0.0, 0.05, 0.2, 1.0, 2.0, 0.01])
    logvar = torch.randn(n, e, generator=g, dtype=torch.float64) * 0.3
    z_syn = z_i + torch.randn(t, n, e, generator=g, dtype=torch.float64)
    return z_i, labels, mu, logvar, z_syn


def _direct(z_i, labels, mu, logvar, z_syn):
    z_i, labels, mu, logvar, z_syn = (a.numpy() for a in (z_i, labels, mu, logvar, z_syn))
    n, e = z_i.shape
    u = z_i / np.linalg.norm(z_i, axis=1, keepdims=True)
    classes = sorted(set(labels.tolist()))
    centre = {c: u[labels == c].mean(0) for c in classes}

    def nearest(v):
        return min(classes, key=lambda c: np.linalg.norm(v - centre[c]))

    out = {"z_i_norm": np.mean([np.linalg.norm(r) for r in z_i]),
           "img_to_centre": np.mean([np.linalg.norm(u[i] - centre[labels[i]]) for i in range(n)]),
           "img_consistency": np.mean([nearest(u[i]) == labels[i] for i in range(n)])}
    var = np.array([np.var(mu[:, j]) for j in range(e)])
    sig = np.exp(0.5 * logvar)
    out.update(mu_norm=np.mean(np.linalg.norm(mu, axis=1)), sigma_mean=sig.mean(),
               active_units=int(sum(v > 0.01 for v in var)), active_frac=sum(v > 0.01 for v in var) / e,
               kl_sum=np.mean([sum(0.5 * (sig[i, j] ** 2 + mu[i, j] ** 2 - 1 - logvar[i, j]) for j in range(e))
                               for i in range(n)]))
    zv, cs, d, cons = [], [], [], []
    for t in range(z_syn.shape[0]):
        for i in range(n):
            s = z_syn[t, i]
            zv.append(np.linalg.norm(s - z_i[i]))
            cs.append(s @ z_i[i] / np.linalg.norm(s) / np.linalg.norm(z_i[i]))
            us = s / np.linalg.norm(s)
            d.append(np.linalg.norm(us - u[i]))
            cons.append(nearest(us) == labels[i])
    out.update(z_v_norm=np.mean(zv), cos_syn=np.mean(cs), syn_to_source=np.mean(d), syn_consistency=np.mean(cons))
    return out


def test_branch_stats_against_loops():
    args = _data()
    got = diag.branch_stats(*args)
    want = _direct(*args)
    assert set(got) == set(diag.BRANCH_KEYS)
    for k, v in want.items():
        assert np.isclose(got[k], v, rtol=1e-6, atol=1e-9), (k, got[k], v)
    assert got["active_units"] == 3  # variances ≈ 0, 0.0025, 0.04, 1, 4, 1e-4


def test_branch_stats_baseline_keys():
    z_i, labels, *_ = _data()
    got = diag.branch_stats(z_i, labels)
    assert set(got) == {"z_i_norm", "img_to_centre", "img_consistency"}


def test_term_gradients_against_separate_backward():
    """Per-term gradient norms and the cosine equal those of separate backward passes on fresh graphs."""
    torch.manual_seed(0)
    model = DVMLHeads(10, 8, 12, **PAPER_HEADS).double()
    loss = DVMLLoss(make_metric_loss("triplet", num_classes=3, embedding_size=8), reduction="mean",
                    likelihood="l2").double()
    x = torch.randn(12, 10, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(4)
    eps = torch.randn(4, 12, 8, dtype=torch.float64)
    lam = Lambdas(0.8, 1.0, 0.2, 0.8, stop_recon_grad=False, phase=2)
    params = [model.embedding.weight, model.embedding.bias]

    def weighted():
        terms = loss(model(x, eps=eps), x, y, lam)
        return terms, diag.weighted_terms(terms, lam, True)

    _, parts = weighted()
    got = diag.term_gradients(parts, params)
    flat = {}
    for k in diag.GRAD_TERMS:
        model.zero_grad()
        _, p = weighted()
        p[k].backward()
        flat[k] = torch.cat([q.grad.flatten() for q in params]).clone()
        assert np.isclose(got[f"grad_norm_{k}"], float(flat[k].norm()), rtol=1e-9)
    model.zero_grad()
    terms, _ = weighted()
    terms["total"].backward()  # the KL does not reach the embedding layer: total's gradient = sum of the three
    total = torch.cat([q.grad.flatten() for q in params])
    torch.testing.assert_close(total, sum(flat.values()))
    cos = float(total @ flat["metric_invariant"] / total.norm() / flat["metric_invariant"].norm())
    assert np.isclose(got["grad_cos_invariant"], cos, rtol=1e-9)
    assert got["grad_cos_invariant"] < 1.0
    other = total - flat["metric_invariant"]
    ratio = float(other.norm() / flat["metric_invariant"].norm())
    assert np.isclose(got["grad_ratio_other"], ratio, rtol=1e-9) and ratio > 0
    assert got["grad_cos_invariant"] >= np.sqrt(1 - ratio ** 2) - 1e-12 if ratio < 1 else True  # the stated bound
    syn = flat["metric_invariant"] + flat["metric_synthetic"]
    assert np.isclose(got["grad_cos_synthetic"], float(syn @ flat["metric_invariant"] / syn.norm()
                                                       / flat["metric_invariant"].norm()), rtol=1e-9)
    # its two factors: Lm(ẑ)'s own direction and weight against Lm(z_I)'s, and the identity that joins them
    s, i = flat["metric_synthetic"], flat["metric_invariant"]
    assert np.isclose(got["grad_cos_syn_term"], float(s @ i / s.norm() / i.norm()), rtol=1e-9)
    assert np.isclose(got["grad_ratio_synthetic"], float(s.norm() / i.norm()), rtol=1e-9)
    rho, c = got["grad_ratio_synthetic"], got["grad_cos_syn_term"]
    assert np.isclose(got["grad_cos_synthetic"], (1 + rho * c) / np.sqrt(1 + rho ** 2 + 2 * rho * c), rtol=1e-9)


def _halves_setup(t, eps_halves=None, seed=0):
    torch.manual_seed(seed)
    model = DVMLHeads(10, 8, 12, **PAPER_HEADS).double()
    loss = DVMLLoss(make_metric_loss("triplet", num_classes=3, embedding_size=8), likelihood="gaussian",
                    reduction="mean").double()
    x = torch.randn(12, 10, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(4)
    eps = torch.randn(t, 12, 8, dtype=torch.float64) if eps_halves is None else eps_halves
    lam = Lambdas(0.8, 1.0, 0.2, 0.8, stop_recon_grad=False, phase=2)
    params = [model.embedding.weight, model.embedding.bias]
    out = model(x, eps=eps)
    terms = loss(out, x, y, lam)
    halves = tuple(diag.weighted_terms(loss(h, x, y, lam), lam, True) for h in diag.draw_halves(out))
    return model, loss, x, y, lam, params, out, terms, halves


def test_expected_gradient_cosine_against_separate_backward():
    """grad_cos_expected and grad_noise_ratio from the two halves' gradients, each by its own backward pass."""
    model, loss, x, y, lam, params, out, terms, halves = _halves_setup(t=6)
    got = diag.term_gradients(diag.weighted_terms(terms, lam, True), params, halves)
    g = []
    for part in diag.draw_halves(out):
        model.zero_grad()
        loss(part, x, y, lam)["total"].backward(retain_graph=True)  # the KL does not reach the embedding layer
        g.append(torch.cat([q.grad.flatten() for q in params]).clone())
    model.zero_grad()
    terms["metric_invariant"].backward(retain_graph=True)
    inv = lam.invariant * torch.cat([q.grad.flatten() for q in params])
    e2 = float(g[0] @ g[1])
    assert np.isclose(got["grad_cos_expected"], float((g[0] + g[1]) @ inv / 2 / np.sqrt(e2) / inv.norm()), rtol=1e-9)
    assert np.isclose(got["grad_noise_ratio"], float((g[0] - g[1]).norm() / 2 / np.sqrt(e2)), rtol=1e-9)
    assert got["grad_noise_ratio"] > 0
    s = []  # Lm(ẑ)'s weighted gradient alone from each half
    for part in diag.draw_halves(out):
        model.zero_grad()
        (lam.synthetic * loss(part, x, y, lam)["metric_synthetic"]).backward(retain_graph=True)
        s.append(torch.cat([q.grad.flatten() for q in params]).clone())
    s2 = float(s[0] @ s[1])
    assert s2 > 0
    assert np.isclose(got["grad_cos_syn_term_expected"], float((s[0] + s[1]) @ inv / 2 / np.sqrt(s2) / inv.norm()),
                      rtol=1e-9)


def test_synthetic_direction_not_estimated_when_the_halves_disagree():
    """⟨s_1, s_2⟩ ≤ 0 (noise swamps Lm(ẑ)'s expected gradient): no estimate is logged for that step, and an
    epoch's mean covers the steps that have one."""
    from types import SimpleNamespace

    from dvml.heads.train import _HeadsFit

    *_, lam, params, _, terms, halves = _halves_setup(t=6)
    flipped = (halves[0], {**halves[1], "metric_synthetic": -halves[0]["metric_synthetic"]})
    got = diag.term_gradients(diag.weighted_terms(terms, lam, True), params, flipped)
    assert "grad_cos_syn_term_expected" not in got and "grad_cos_expected" in got
    steps = [{"grad_cos_invariant": 0.9, "grad_cos_syn_term_expected": 0.5}, {"grad_cos_invariant": 0.7}]
    epoch = _HeadsFit._diagnostics(SimpleNamespace(diag_x=None), steps)
    assert epoch == pytest.approx({"grad_cos_invariant": 0.8, "grad_cos_syn_term_expected": 0.5, "grad_samples": 2})


def test_expected_gradient_cosine_without_draw_noise():
    """Both halves drawing the same noise: no draw noise, and the expectation is the step's own gradient."""
    e = torch.randn(3, 12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, _, _, _, lam, params, _, terms, halves = _halves_setup(t=6, eps_halves=torch.cat([e, e]))
    got = diag.term_gradients(diag.weighted_terms(terms, lam, True), params, halves)
    assert got["grad_noise_ratio"] < 1e-9
    assert np.isclose(got["grad_cos_expected"], got["grad_cos_invariant"], rtol=1e-9)
    assert np.isclose(got["grad_cos_syn_term_expected"], got["grad_cos_syn_term"], rtol=1e-9)
    assert got["grad_cos_invariant"] < 1.0


def test_expected_gradient_cosine_converges_with_many_draws():
    """With thousands of draws each half is the expectation itself: the estimate and the step's cosine agree and
    the draw noise vanishes; with two draws it is many times larger."""
    _, _, _, _, lam, params, _, terms, halves = _halves_setup(t=4000)
    many = diag.term_gradients(diag.weighted_terms(terms, lam, True), params, halves)
    assert many["grad_noise_ratio"] < 0.05
    assert abs(many["grad_cos_expected"] - many["grad_cos_invariant"]) < 2e-3
    assert abs(many["grad_cos_syn_term_expected"] - many["grad_cos_syn_term"]) < 1e-2
    *_, lam2, params2, _, terms2, halves2 = _halves_setup(t=2)
    few = diag.term_gradients(diag.weighted_terms(terms2, lam2, True), params2, halves2)
    assert few["grad_noise_ratio"] > 10 * many["grad_noise_ratio"]


def test_draw_halves_needs_two_draws():
    model = DVMLHeads(10, 8, 12, **PAPER_HEADS)
    assert diag.draw_halves(model(torch.randn(4, 10), samples=1)) is None
    a, b = diag.draw_halves(model(torch.randn(4, 10), samples=5))
    assert a.z_syn.shape[0] == b.z_syn.shape[0] == 2 and a.x_hat.shape[0] == 2


def test_term_gradients_phase1_recon_is_zero():
    torch.manual_seed(0)
    model = DVMLHeads(10, 8, 12, **PAPER_HEADS).double()
    loss = DVMLLoss(make_metric_loss("triplet", num_classes=3, embedding_size=8), reduction="mean",
                    likelihood="l2").double()
    x = torch.randn(12, 10, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(4)
    lam = Lambdas(1.0, 1.0, 0.1, 1.0, stop_recon_grad=True, phase=1)
    terms = loss(model(x, samples=3, stop_recon_grad=True), x, y, lam)
    got = diag.term_gradients({"recon": terms["recon"], "metric_invariant": terms["metric_invariant"]},
                              [model.embedding.weight, model.embedding.bias])
    assert got["grad_norm_recon"] == 0.0
    assert np.isclose(got["grad_cos_invariant"], 1.0)


FAST = dict(embedding_size=8, decoder_hidden=16, samples=3, batch_size=16, per_class=4, lr=3e-3,
            kl_warmup_epochs=1, phase2_epoch=1, eval_every=0, epochs=3, grad_every=2, device="cpu")


def _from_checkpoint(ckpt, x, eps, labels):
    """z_I, μ, log σ², ẑ of features x by hand from the checkpoint's weights (normalized space, class scale)."""
    sd = {k: v.double().numpy() for k, v in ckpt.items()}
    x = x.double().numpy()
    z_i = x @ sd["embedding.weight"].T + sd["embedding.bias"]
    mu = x @ sd["mu.weight"].T + sd["mu.bias"]
    logvar = x @ sd["logvar.weight"].T + sd["logvar.bias"]
    u = z_i / np.linalg.norm(z_i, axis=1, keepdims=True)
    y = labels.numpy()
    dev = np.concatenate([u[y == c] - u[y == c].mean(0) for c in np.unique(y)])
    s = np.sqrt((dev ** 2).sum() / ((len(y) - len(np.unique(y))) * u.shape[1]))
    z_syn = u + s * (mu + np.exp(0.5 * logvar) * eps.double().numpy())
    return [torch.from_numpy(a) for a in (z_i, mu, logvar, z_syn)]


def test_logged_epoch_diagnostics_equal_a_direct_computation(tiny_cache, tmp_path):
    """The last epoch's record = the statistics of the final model on the seeded subset with the seeded noise;
    gradient statistics are logged every epoch; the baseline logs the z_I ones only."""
    from dvml.cache import load_split
    from dvml.heads import FitConfig, fit
    from dvml.runs import load_checkpoint, read_log
    from dvml.seeding import diag_seeds

    run = fit(FitConfig(cache=tiny_cache, out=tmp_path / "run", diag_images=20, **FAST))
    recs = read_log(run)
    last = recs[-1]
    ckpt = load_checkpoint(run)["resume"]["model"]
    train = load_split(tiny_cache, "train")
    y_all = torch.from_numpy(np.unique(train.labels, return_inverse=True)[1].astype(np.int64))
    idx = torch.sort(torch.randperm(len(y_all), generator=torch.Generator().manual_seed(diag_seeds(0)[0]))[:20]).values
    x = torch.from_numpy(np.ascontiguousarray(train.features[idx.numpy(), 0], dtype=np.float32))
    y = y_all[idx]
    eps = torch.randn((2, 20, 8), generator=torch.Generator().manual_seed(diag_seeds(0)[1]))
    z_i, mu, logvar, z_syn = _from_checkpoint(ckpt, x, eps, y)
    want = _direct(z_i, y, mu, logvar, z_syn)
    want["z_v_norm"] = float((z_syn - torch.nn.functional.normalize(z_i, dim=-1)).norm(dim=-1).mean())
    for k, v in want.items():
        assert np.isclose(last[k], v, rtol=1e-4, atol=1e-5), (k, last[k], v)
    assert all(set(diag.GRAD_KEYS) <= set(r) and r["grad_samples"] >= 1 for r in recs)
    assert recs[0]["grad_norm_recon"] == 0.0 and recs[-1]["grad_norm_recon"] > 0  # phase 1, then phase 2
    base = fit(FitConfig(cache=tiny_cache, out=tmp_path / "base", dvml=False, **FAST))
    rb = read_log(base)[-1]
    # the baseline's gradient is Lm(z_I)'s by definition: no gradient sampling (it would only cost time)
    assert "grad_cos_invariant" not in rb and "active_frac" not in rb and "img_consistency" in rb


@pytest.mark.parametrize("loss", ["triplet", "triplet-dws"])  # dws draws negatives: the halves must put them back
def test_diagnostics_do_not_change_the_fit(tiny_cache, tmp_path, loss):
    from dvml.heads import FitConfig, fit
    from dvml.runs import load_checkpoint, read_log

    run = fit(FitConfig(cache=tiny_cache, out=tmp_path / "a", loss=loss, **FAST))
    assert set(diag.GRAD_DRAW_KEYS) <= set(read_log(run)[-1])
    a = load_checkpoint(run)["model"]
    b = load_checkpoint(fit(FitConfig(cache=tiny_cache, out=tmp_path / "b", diag_images=0, grad_every=0, loss=loss,
                                      **{k: v for k, v in FAST.items() if k != "grad_every"})))["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_run_report_and_ablate_columns_read_the_run(tiny_cache, tmp_path):
    from dvml.experiments.ablate import run_diagnostics
    from dvml.experiments.branch_report import CHECKS, run_report
    from dvml.heads import FitConfig, fit
    from dvml.runs import read_log

    run = fit(FitConfig(cache=tiny_cache, out=tmp_path / "run", **FAST))
    recs = read_log(run)
    rep = run_report(run)
    p2 = [r["grad_cos_invariant"] for r in recs if r["phase"] == 2]
    assert rep["train_time"]["grad_cos_invariant_phase2"] == pytest.approx(np.mean(p2))
    hard = recs[-1]["metric_synthetic"] - recs[-1]["metric_invariant"]
    assert set(rep["checks"]) == {c[0] for c in CHECKS}
    c = rep["vs_noise"]["consistency"]
    assert rep["checks"]["consistency_vs_noise"]["value"] == pytest.approx(c["learned"] - c["noise"])
    assert set(diag.BRANCH_KEYS) <= set(rep["final"])
    cols = run_diagnostics(run)
    assert cols["diag_grad_cos"] == pytest.approx(np.mean(p2)) and cols["diag_hardness"] == pytest.approx(hard)
    assert cols["diag_active_frac"] == recs[-1]["active_frac"]
    ratio = np.mean([r["grad_ratio_other"] for r in recs if r["phase"] == 2])
    expected = np.mean([r["grad_cos_expected"] for r in recs if r["phase"] == 2])
    assert cols["diag_grad_cos_expected"] == pytest.approx(expected)
    assert cols["diag_grad_cos_synthetic"] == pytest.approx(np.mean([r["grad_cos_synthetic"] for r in recs
                                                                     if r["phase"] == 2]))
    assert rep["train_time"]["grad_cos_expected_phase2"] == pytest.approx(expected)
    for col, key in (("diag_grad_ratio_synthetic", "grad_ratio_synthetic"),
                     ("diag_grad_cos_syn_term", "grad_cos_syn_term_expected")):
        want = np.mean([r[key] for r in recs if r["phase"] == 2 and key in r])
        assert cols[col] == pytest.approx(want) and rep["train_time"][f"{key}_phase2"] == pytest.approx(want)
    assert rep["train_time"]["grad_cos_syn_term_phase2"] == pytest.approx(
        np.mean([r["grad_cos_syn_term"] for r in recs if r["phase"] == 2]))
    assert cols["diag_grad_ratio"] == pytest.approx(ratio) and rep["train_time"]["grad_ratio_other_phase2"] == \
        pytest.approx(ratio)
