"""FitConfig validation, defaults from the paper, and the phase/λ schedule."""

from __future__ import annotations

import pytest

from dvml.heads.config import (
    DEFAULT_PROXY_LR,
    DEFAULT_RECON_SHARE,
    PAPER_PHASE2_LAMBDAS,
    PAPER_RECON_SHARE,
    PHASE1_LAMBDAS,
    PHASE2_LAMBDAS,
    FitConfig,
)
from dvml.losses import LossName


def cfg(**kw):
    return FitConfig(cache="c.h5", out="run", **kw)


def test_paper_defaults():
    """The paper's settings, the phase-2 weights included (the written protocol's choice: see the next test)."""
    c = cfg()
    assert (c.embedding_size, c.samples, c.lr) == (512, 20, 1e-4)
    assert c.lambdas_phase1 == (1.0, 1.0, 0.1, 1.0) and c.lambdas_phase2 == (0.8, 1.0, 0.2, 0.8)
    assert c.recon_share == DEFAULT_RECON_SHARE == 1.0
    assert PAPER_PHASE2_LAMBDAS == (0.8, 1.0, 0.2, 0.8) and PAPER_RECON_SHARE == 1.0
    paper = cfg(lambdas_phase2=PAPER_PHASE2_LAMBDAS, recon_share=PAPER_RECON_SHARE, phase2_epoch=2,
                kl_warmup_epochs=0)
    assert tuple(paper.lambdas(3.0))[:4] == PAPER_PHASE2_LAMBDAS
    assert c.batch_size == 120 and cfg(loss="npair").batch_size == 128 and cfg(loss="proxy-nca").batch_size == 128
    assert cfg(loss="npair").per_class == 2 and c.per_class == 4
    assert c.proxy_lr == DEFAULT_PROXY_LR == 0.1 and cfg(lr=1e-3).proxy_lr == 0.1
    assert cfg(proxy_lr=0.02).proxy_lr == 0.02
    assert c.loss is LossName.triplet


def test_phase2_defaults_are_the_written_protocols_choice():
    """fit-heads' phase-2 defaults are the candidate the committed decision file chose (results/protocol-defaults,
    made by ``python -m dvml.experiments.protocols.defaults`` on validation classes before any test look)."""
    import json
    from pathlib import Path

    from dvml.experiments.protocols.defaults import CANDIDATES, RULE, decide

    dec = json.loads((Path(__file__).parents[2] / "results" / "protocol-defaults" / "decision.json").read_text())
    assert dec["complete"] and dec["rule"] == RULE and decide(dec["scores"]) == dec["choice"]
    chosen = {c.name: c for c in CANDIDATES}[dec["choice"]]
    assert tuple(dec["candidates"][dec["choice"]]["lambdas_phase2"]) == chosen.lambdas_phase2
    assert (PHASE2_LAMBDAS, DEFAULT_RECON_SHARE) == (chosen.lambdas_phase2, chosen.recon_share)
    assert len(dec["fits"]) == len(CANDIDATES) * len(dec["sets"]) * len(dec["schedules"]) * dec["seeds"]


def test_phase2_lambdas_differ_from_phase1():
    """Deviation 4 of public reimplementations: phase-2 λs left at the phase-1 values."""
    c = cfg(phase2_epoch=10, kl_warmup_epochs=0)
    p1, p2 = c.lambdas(9.99), c.lambdas(10.0)
    assert (p1.kl, p1.recon, p1.synthetic, p1.invariant) == PHASE1_LAMBDAS and p1.phase == 1 and p1.stop_recon_grad
    k = DEFAULT_RECON_SHARE
    assert (p2.kl / k, p2.recon / k, p2.synthetic, p2.invariant) == PHASE2_LAMBDAS and p2.phase == 2
    assert not p2.stop_recon_grad
    assert PHASE1_LAMBDAS != PHASE2_LAMBDAS


def test_recon_share_scales_only_phase2_kl_and_recon():
    """k multiplies phase 2's λ1 (after the warm-up) and λ2 and nothing else; phase 1 keeps the paper's weights;
    a config without the field (every run before it) reads back as k = 1."""
    c = cfg(phase2_epoch=10, kl_warmup_epochs=20, recon_share=16, lambdas_phase2=PAPER_PHASE2_LAMBDAS)
    p1, p2 = c.lambdas(9.0), c.lambdas(15.0)
    assert (p1.kl, p1.recon, p1.synthetic, p1.invariant) == pytest.approx((9 / 20, 1.0, 0.1, 1.0))
    assert (p2.kl, p2.recon, p2.synthetic, p2.invariant) == pytest.approx((16 * 0.8 * 15 / 20, 16.0, 0.2, 0.8))
    assert c.lambdas(25.0).kl == pytest.approx(16 * 0.8)
    same = cfg(phase2_epoch=10, kl_warmup_epochs=20, lambdas_phase2=(12.8, 16.0, 0.2, 0.8), recon_share=1)
    for t in (3.0, 12.5, 40.0):
        assert c.lambdas(t) == pytest.approx(same.lambdas(t))
    old = {k: v for k, v in cfg().to_dict().items() if k != "recon_share"}
    assert FitConfig.from_dict(old).recon_share == 1.0 and cfg().recon_share == DEFAULT_RECON_SHARE
    assert FitConfig.from_dict(cfg(recon_share=2.5).to_dict()).recon_share == 2.5


def test_kl_warmup_is_linear_then_flat():
    c = cfg(kl_warmup_epochs=30, phase2_epoch=100)
    assert c.lambdas(0).kl == 0.0
    assert c.lambdas(15).kl == pytest.approx(0.5)
    assert c.lambdas(30).kl == pytest.approx(1.0) and c.lambdas(80).kl == pytest.approx(1.0)
    assert c.lambdas(15).recon == 1.0  # only λ1 is annealed
    c2 = cfg(kl_warmup_epochs=30, phase2_epoch=20)
    assert c2.lambdas(25).kl == pytest.approx(DEFAULT_RECON_SHARE * PHASE2_LAMBDAS[0] * 25 / 30)


@pytest.mark.parametrize("kw, match", [
    (dict(loss="nope"), "^loss must be one of triplet, npair, .*, got 'nope'$"),
    (dict(loss="npair", per_class=4), "npair"),
    (dict(batch_size=30, per_class=4), "multiple of per_class"),
    (dict(per_class=1), "per_class"),
    (dict(samples=0), "samples"),
    (dict(lr=0), "lr"),
    (dict(lambdas_phase1=(1, 1, 1)), "lambdas_phase1"),
    (dict(lambdas_phase2=(1, 1, -1, 1)), "lambdas_phase2"),
    (dict(device="tpu"), "^device must be one of auto, cpu, cuda, mps, got 'tpu'$"),
    (dict(val_classes=5, eval_every=0), "val_classes"),
    (dict(reduction="max"), "^reduction must be one of sum, mean, got 'max'$"),
    # NaN/inf would pass "< 0" checks and surface only as a NaN loss blamed on the features
    (dict(lambdas_phase1=(1, 1, float("nan"), 1)), "lambdas_phase1 must be four finite"),
    (dict(lambdas_phase2=(1, float("inf"), 0.2, 1)), "lambdas_phase2 must be four finite"),
    (dict(lr=float("inf")), "lr must be a finite number"),
    (dict(recon_share=0), "recon_share must be > 0"),
    (dict(recon_share=float("nan")), "recon_share must be a finite number"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number"),
    (dict(margin=float("nan")), "margin must be a finite number"),
    (dict(variance_kappa=float("inf")), "variance_kappa must be a finite number"),
])
def test_invalid_options_name_the_option(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kw)


def test_dict_round_trip_and_model_dict():
    c = cfg(loss="proxy-anchor", epochs=7, val_classes=3)
    d = c.to_dict()
    assert d["loss"] == "proxy-anchor" and d["cache"] == "c.h5" and isinstance(d["lambdas_phase1"], list)
    assert FitConfig.from_dict(d) == c
    md = c.model_dict()
    assert "epochs" not in md and "resume" not in md and "cache" not in md and md["val_classes"] == 3


def test_string_options_are_enums_and_recorded_as_strings():
    """likelihood, variance_space, variance_scale, metric_reduction take their strings (config files, --set, old
    runs) and hold enum members; config.json records the plain strings."""
    import json

    from dvml.heads.config import Likelihood, Reduction, VarianceScale, VarianceSpace
    from dvml.losses import MetricReduction

    d = cfg()
    assert (d.likelihood, d.variance_space, d.variance_scale) == (Likelihood.gaussian, VarianceSpace.normalized,
                                                                  VarianceScale.class_)
    assert d.reduction is Reduction.sum and d.metric_reduction is MetricReduction.sum  # triplet: the paper's sums
    assert cfg(reduction="mean").metric_reduction is MetricReduction.nonzero
    c = cfg(likelihood="l2", variance_space="raw", variance_scale="unit", metric_reduction="mean")
    assert c.likelihood is Likelihood.l2 and c.variance_space is VarianceSpace.raw
    assert c.variance_scale is VarianceScale.unit and c.metric_reduction is MetricReduction.mean
    rec = c.to_dict()
    for name, value in (("likelihood", "l2"), ("variance_space", "raw"), ("variance_scale", "unit"),
                        ("metric_reduction", "mean"), ("reduction", "sum")):
        assert type(rec[name]) is str and rec[name] == value, name
    assert json.loads(json.dumps(rec)) == rec and FitConfig.from_dict(rec) == c
    assert c.heads_kwargs()["variance_space"] is VarianceSpace.raw


def test_an_old_config_with_strings_loads():
    """A run's config as dvml wrote it before the enums (plain strings, fit-heads' remedies) reads back."""
    old = {"cache": "c.h5", "out": "run", "loss": "triplet", "reduction": "sum", "metric_reduction": "sum",
           "likelihood": "gaussian", "standardize": False, "free_bits": 0.0, "variance_space": "normalized",
           "variance_scale": "class", "variance_kappa": 1.0, "metric_grad_to_variance": True, "centre_mu": False,
           "triplet_input": False, "lambdas_phase1": [1.0, 1.0, 0.1, 1.0], "device": "cpu"}
    c = FitConfig.from_dict(old)
    # recorded, not today's default; the phase-2 weights of its time (the paper's)
    assert c == cfg(device="cpu", metric_grad_to_variance=True, lambdas_phase2=PAPER_PHASE2_LAMBDAS,
                    recon_share=PAPER_RECON_SHARE)
    assert {k: v for k, v in c.to_dict().items() if k in old} == old


@pytest.mark.parametrize("kw, match", [
    (dict(likelihood="laplace"), "likelihood must be one of l2, gaussian, got 'laplace'"),
    (dict(variance_space="sphere"), "variance_space must be one of raw, normalized"),
    (dict(variance_scale="batch"), "variance_scale must be one of unit, class"),
    (dict(metric_reduction="max"), "metric_reduction must be one of nonzero, sum, mean"),
    (dict(variance_kappa=0), "variance_kappa"),
    (dict(free_bits=-1), "free_bits"),
])
def test_invalid_choices_name_the_option_and_its_choices(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kw)


def test_synthetic_pairs_default_and_which_losses_take_cross():
    """within (the paper's eq. 10) by default for every loss; cross only where a pair has an anchor."""
    from dvml.losses import CROSS_PAIR_LOSSES, SyntheticPairs

    assert all(cfg(loss=loss).synthetic_pairs is SyntheticPairs.within for loss in LossName)
    assert CROSS_PAIR_LOSSES == {LossName.triplet, LossName.triplet_dws, LossName.npair}
    for loss in CROSS_PAIR_LOSSES:
        c = cfg(loss=loss, synthetic_pairs="cross")
        assert c.synthetic_pairs is SyntheticPairs.cross and c.to_dict()["synthetic_pairs"] == "cross"
    with pytest.raises(ValueError, match="^synthetic_pairs cross needs anchors to pair: it is for npair, triplet, "
                                         "triplet-dws, not loss proxy-nca-pp$"):
        cfg(loss="proxy-nca-pp", synthetic_pairs="cross")
    with pytest.raises(ValueError, match="synthetic_pairs must be one of within, cross, got 'both'"):
        cfg(synthetic_pairs="both")


def test_variance_space_follows_the_losses_geometry():
    """z_V is added where the metric loss compares: on the unit sphere for the losses that L2-normalise, to raw
    z_I for N-pair's dot products; an explicit choice is kept and recorded."""
    from dvml.heads.config import VarianceSpace
    from dvml.losses.names import DOT_PRODUCT_LOSSES

    assert DOT_PRODUCT_LOSSES == {LossName.npair}
    for loss in LossName:
        want = VarianceSpace.raw if loss is LossName.npair else VarianceSpace.normalized
        assert cfg(loss=loss).variance_space is want, loss
    assert cfg(loss="npair", variance_space="normalized").variance_space is VarianceSpace.normalized
    assert cfg(loss="triplet", variance_space="raw").to_dict()["variance_space"] == "raw"
    assert cfg(loss="npair").to_dict()["variance_space"] == "raw"


def test_lm_zhat_does_not_train_the_variance_branch_by_default():
    """Issue 14: through μ and σ, Lm(ẑ) trained the generator of its own inputs towards easy samples and an
    input-independent μ; by default μ and σ learn from the KL and reconstruction only (the paper's form is an
    option, recorded)."""
    assert cfg().metric_grad_to_variance is False and cfg().heads_kwargs()["metric_grad_to_variance"] is False
    assert cfg(metric_grad_to_variance=True).to_dict()["metric_grad_to_variance"] is True
