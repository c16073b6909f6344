"""``dvml.heads.stacked``: a stack's members are the one-by-one fits of their seeds (:func:`dvml.heads.fit`).

For each stacked loss, baseline, DVML and the noise control arm (``variance_source="noise"``): every epoch's loss
terms within 1e-5 relative, the final test Recall@1 within 0.5 points per member and 0.2 on the grid's mean, the
same branch diagnostics and gradient statistics, and checkpoints (weights, Adam moments, generator states) that
match. A mutation — the members sharing one noise draw — must break the match (checked, DVML and the noise arm).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dvml import runs as R
from dvml.cache import load_split
from dvml.evaluate import evaluate_target
from dvml.extract.synth import SynthConfig, generate
from dvml.heads import stacked
from dvml.heads.config import FitConfig
from dvml.heads.stacked import StackedFit, fit_stacked, group_key, stack_reason
from dvml.heads.train import fit

SEEDS = (0, 1)
#: the ablation's three arms: the baseline, DVML, and DVML's training with z_V isotropic noise (the control)
ARMS = ("base", "dvml", "noise")
CASES = [(loss, arm) for loss in ("triplet", "npair", "triplet-dws") for arm in ARMS]
TERM_KEYS = ("kl", "recon", "metric_invariant", "metric_synthetic", "total")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = generate(SynthConfig(n_classes=24, images_per_class=10, views=2, feature_dim=32, class_dim=8,
                                variation_dim=4, hidden_dim=16), tmp_path_factory.mktemp("stacked") / "w.h5")
    return path, load_split(path, "train"), load_split(path, "test")


def configs(path, root, loss, arm, tag):
    kw = {"cache": path, "loss": loss, "dvml": arm != "base",
          "variance_source": "noise" if arm == "noise" else "learned", "epochs": 3, "embedding_size": 16,
          "decoder_hidden": 16, "samples": 4, "batch_size": 16 if loss == "npair" else 24, "lr": 1e-3, "eval_every": 1,
          "grad_every": 4, "diag_images": 64, "device": "cpu"}
    return [FitConfig(out=root / f"{loss}-{arm}-s{s}-{tag}", seed=s, **kw) for s in SEEDS]


def mismatches(stacked, one) -> list[str]:
    """Where stacked members differ from the one-by-one fits beyond the acceptance tolerances."""
    bad = []
    r_st, r_one = [], []
    for a, b in zip(stacked, one, strict=True):
        la, lb = R.read_log(a), R.read_log(b)
        assert len(la) == len(lb) == 3
        for ra, rb in zip(la, lb, strict=True):
            for k in TERM_KEYS:
                if abs(ra[k] - rb[k]) > 1e-5 * max(abs(rb[k]), 1e-12):
                    bad.append(f"{a.name} epoch {ra['epoch']} {k}: {ra[k]} vs {rb[k]}")
        r_st.append(100 * la[-1]["test_recall@1"])
        r_one.append(100 * lb[-1]["test_recall@1"])
        if abs(r_st[-1] - r_one[-1]) > 0.5:
            bad.append(f"{a.name} Recall@1 {r_st[-1]:.2f} vs {r_one[-1]:.2f}")
    if abs(sum(r_st) / len(r_st) - sum(r_one) / len(r_one)) > 0.2:
        bad.append(f"mean Recall@1 {sum(r_st) / len(r_st):.2f} vs {sum(r_one) / len(r_one):.2f}")
    return bad


def fit_one_by_one(world, root, cases, make_configs) -> dict:
    """Each case's configs (``make_configs(path, root, loss, arm, "one")``) fitted one after another: (loss, arm) ->
    their run directories."""
    path, train, test = world
    out = {}
    for loss, arm in cases:
        cfgs = make_configs(path, root, loss, arm, "one")
        for c in cfgs:
            fit(c, train=train, test=test)
        out[(loss, arm)] = [c.out for c in cfgs]
    return out


@pytest.fixture(scope="module")
def one_by_one(world, tmp_path_factory):
    return fit_one_by_one(world, tmp_path_factory.mktemp("one"), CASES, configs)


@pytest.mark.parametrize(("loss", "arm"), CASES)
def test_members_are_the_one_by_one_fits(world, one_by_one, tmp_path, loss, arm):
    path, train, test = world
    cfgs = configs(path, tmp_path, loss, arm, "st")
    dvml = arm != "base"
    outs = fit_stacked(cfgs, train=train, test=test)
    ref = one_by_one[(loss, arm)]
    assert mismatches(outs, ref) == []
    for a, b in zip(outs, ref, strict=True):
        la, lb = R.read_log(a)[-1], R.read_log(b)[-1]
        for k in ("active_frac", "kl_sum", "syn_consistency", "grad_cos_invariant", "grad_ratio_other"):
            assert (k in la) == (k in lb) == dvml, k
            if dvml:
                assert la[k] == pytest.approx(lb[k], rel=1e-4, abs=1e-6), k
        ca, cb = torch.load(a / R.HEADS_FILE, weights_only=True), torch.load(b / R.HEADS_FILE, weights_only=True)
        assert set(ca) == set(cb) | {"stack"}  # the stack's members, beside its trainer
        assert ca["model"].keys() == cb["model"].keys()
        for k in ca["model"]:
            torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=1e-4, atol=1e-6)
        sa, sb = ca["resume"]["optimizer"], cb["resume"]["optimizer"]
        assert sa["param_groups"] == sb["param_groups"]
        for j in sb["state"]:
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(sa["state"][j][k], sb["state"][j][k], rtol=1e-3, atol=1e-8)
            assert float(sa["state"][j]["step"]) == float(sb["state"][j]["step"])
        for k in ("sampler", "noise", "torch"):  # each member consumed its generators as its own fit did
            assert torch.equal(ca["resume"]["rng"][k], cb["resume"]["rng"][k]), k
        if arm == "noise":  # no encoder: KL 0 every epoch, no μ, log σ² layers in the checkpoint
            assert all(r["kl"] == 0.0 for r in R.read_log(a))
            assert not any(k.startswith(("mu.", "logvar.")) for k in ca["model"])
        conf_a, conf_b = (json.loads((d / R.CONFIG_FILE).read_text()) for d in (a, b))
        assert conf_a["trainer"] == "stacked" and conf_b["trainer"] == "one-by-one"
        assert conf_a["config"] == {**conf_b["config"], "out": str(a)} and conf_a["status"] == "finished"


@pytest.mark.parametrize("arm", ["dvml", "noise"])
def test_a_shared_noise_draw_breaks_the_match(world, one_by_one, tmp_path, monkeypatch, arm):
    """The mutation: every member gets member 0's noise. The members other than seed 0 then differ from their
    one-by-one fits, and :func:`mismatches` says so."""
    path, train, test = world

    def shared(self, shape):
        eps = torch.randn(shape, generator=self.gen_dev[0], device=self.device)
        return eps.expand(len(self.gen_dev), *shape)

    monkeypatch.setattr(StackedFit, "draw_eps", shared)
    outs = fit_stacked(configs(path, tmp_path, "triplet", arm, "mut"), train=train, test=test)
    bad = mismatches(outs, one_by_one[("triplet", arm)])
    assert bad and all("-s0-" not in b for b in bad), bad


def test_a_stacked_run_evaluates_as_its_one_by_one_twin(world, one_by_one, tmp_path):
    path, train, test = world
    outs = fit_stacked(configs(path, tmp_path, "npair", "dvml", "ev"), train=train, test=test)
    ma = evaluate_target(outs[0], clustering=False)
    mb = evaluate_target(one_by_one[("npair", "dvml")][0], clustering=False)
    assert abs(ma["recall@1"] - mb["recall@1"]) <= 0.005 and abs(ma["map@r"] - mb["map@r"]) <= 0.005


def test_what_does_not_stack_says_why(world, tmp_path):
    path, train, test = world
    base = {"cache": path, "out": tmp_path / "x", "epochs": 1}
    assert stack_reason(FitConfig(loss="triplet", **base)) is None
    assert "proxy-nca" in stack_reason(FitConfig(loss="proxy-nca", **base))
    assert "val_classes" in stack_reason(FitConfig(loss="triplet", val_classes=4, **base))
    assert "triplet input" in stack_reason(FitConfig(loss="triplet", triplet_input=True, **base))
    assert set(stacked.STACKED_FIELDS) <= {f.name for f in dataclasses.fields(FitConfig)}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Later(FitConfig):  # an option added after the stacked trainer was written
        noise_arm: bool = False

    assert stack_reason(Later(loss="triplet", **base)) is None
    assert "noise_arm" in stack_reason(Later(loss="triplet", noise_arm=True, **base))
    assert group_key(FitConfig(loss="triplet", seed=1, **base)) == group_key(FitConfig(loss="triplet", seed=2, **base))
    assert group_key(FitConfig(loss="triplet", **base)) == group_key(FitConfig(loss="triplet", lr=1e-3, **base))
    assert group_key(FitConfig(loss="triplet", **base)) != group_key(FitConfig(loss="triplet", samples=4, **base))
    with pytest.raises(ValueError, match="differ only in seed, out, lr"):
        StackedFit([FitConfig(loss="triplet", **base), FitConfig(loss="triplet", samples=4, **base)], train, test)
    noise = FitConfig(loss="triplet", variance_source="noise", **base)
    assert stack_reason(noise) is None
    assert group_key(noise) != group_key(FitConfig(loss="triplet", **base))  # a stack never mixes the sources
    with pytest.raises(ValueError, match="differ only in seed, out, lr"):
        StackedFit([FitConfig(loss="triplet", **base), noise], train, test)
    with pytest.raises(ValueError, match="no stacked form"):
        StackedFit([FitConfig(loss="contrastive", **base)], train, test)


def test_the_squared_error_matches_its_autograd_reference():
    """The stacked reconstruction's fused squared error against ``(x_hat - x).square().sum()`` and its autograd
    gradient (float64: gradcheck), and it refuses a target that takes a gradient."""
    g = torch.Generator().manual_seed(0)
    x_hat = torch.randn(3, 4, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 1, 6, 5, generator=g, dtype=torch.float64)
    got = stacked._SquaredError.apply(x_hat, x)
    want = (x_hat - x).square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    w = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    (ga,) = torch.autograd.grad((got * w).sum(), x_hat)
    (gb,) = torch.autograd.grad((want * w).sum(), x_hat)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda a: stacked._SquaredError.apply(a, x), (x_hat,))
    with pytest.raises(ValueError, match="no gradient"):
        stacked._SquaredError.apply(x_hat, x.clone().requires_grad_(True))


def test_the_noise_arms_stack_holds_no_encoder(world, tmp_path):
    """A noise-arm stack's input layer is the embedding alone (k = 1: E rows per member, as the baseline's) beside
    the decoder, and its KL term is exactly 0."""
    path, train, test = world
    fit_ = StackedFit(configs(path, tmp_path, "triplet", "noise", "k"), train, test)
    e, d = fit_.cfg.embedding_size, fit_.dims[2]
    assert not fit_.stack.learned and fit_.stack.w_in.shape == (len(SEEDS), e, d)
    assert len(fit_.stack.params) == 6
    assert set(fit_.stack.member(1)) == {n for n, _ in fit_.models[1].named_parameters()}
    idx = fit_.samplers[0].epoch_with_ranks()[0][0]  # one class-balanced batch, given to every member
    x = fit_.feats[idx, 0].float().expand(len(SEEDS), len(idx), d)
    y = fit_.labels[idx].expand(len(SEEDS), len(idx))
    terms = fit_.terms(x, y, fit_.lambdas(0.0))
    assert terms[:, 0].tolist() == [0.0] * len(SEEDS) and bool((terms[:, 1] > 0).all())
