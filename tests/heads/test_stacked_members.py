"""``dvml.heads.stacked`` with members that differ in the hyper-parameters ``dvml tune`` searches (lr, the λ of both
phases, ``recon_share``, ``margin``): each member is still its one-by-one fit.

Every epoch's loss terms within 1e-5 relative and the final test Recall@1 within 0.5 points per member, the
member's own lr in its checkpoint's Adam state; mutations — the members sharing member 0's lr, λ or margin — must
break the match (checked).
"""

from __future__ import annotations

import pytest
import torch

from dvml import runs as R
from dvml.cache import load_split
from dvml.extract.synth import SynthConfig, generate
from dvml.heads.config import FitConfig
from dvml.heads.stacked import StackedFit, fit_stacked, group_key

from .test_stacked import fit_one_by_one, mismatches  # the acceptance's tolerances, one definition

TERM_KEYS = ("kl", "recon", "metric_invariant", "metric_synthetic", "total")
#: three trials of a study: each member its own lr, λ (both phases), reconstruction share and margin
MEMBERS = [
    {"lr": 1e-3, "lambdas_phase1": (1.0, 1.0, 0.1, 1.0), "lambdas_phase2": (0.8, 1.0, 0.2, 0.8), "recon_share": 1.0,
     "margin": 0.2},
    {"lr": 3e-3, "lambdas_phase1": (0.5, 2.0, 0.3, 1.0), "lambdas_phase2": (0.2, 4.0, 1.5, 0.5), "recon_share": 4.0,
     "margin": 0.05},
    {"lr": 4e-4, "lambdas_phase1": (1.5, 0.5, 0.05, 2.0), "lambdas_phase2": (2.0, 0.3, 0.6, 3.0), "recon_share": 0.5,
     "margin": 0.4},
]
#: (loss, arm): "dvml", "base", or "noise" (DVML's training with z_V isotropic noise, the ablation's control)
CASES = [("triplet", "dvml"), ("npair", "dvml"), ("triplet-dws", "dvml"), ("triplet", "base"), ("npair", "noise")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = generate(SynthConfig(n_classes=24, images_per_class=10, views=2, feature_dim=32, class_dim=8,
                                variation_dim=4, hidden_dim=16), tmp_path_factory.mktemp("members") / "w.h5")
    return path, load_split(path, "train"), load_split(path, "test")


def configs(path, root, loss, arm, tag) -> list[FitConfig]:
    dvml = arm != "base"
    kw = {"cache": path, "loss": loss, "dvml": dvml, "variance_source": "noise" if arm == "noise" else "learned",
          "epochs": 3, "phase2_epoch": 1, "kl_warmup_epochs": 1,
          "embedding_size": 16, "decoder_hidden": 16, "samples": 4, "batch_size": 16 if loss == "npair" else 24,
          "eval_every": 1, "grad_every": 4, "diag_images": 64, "device": "cpu", "seed": 0}
    out = []
    for j, member in enumerate(MEMBERS):
        m = {k: v for k, v in member.items() if k != "margin" or loss != "npair"}  # npair takes no margin
        if not dvml:
            m = {k: v for k, v in m.items() if k in ("lr", "margin")}
        out.append(FitConfig(out=root / f"{loss}-{arm}-m{j}-{tag}", **kw, **m))
    return out


@pytest.fixture(scope="module")
def one_by_one(world, tmp_path_factory):
    return fit_one_by_one(world, tmp_path_factory.mktemp("one"), CASES, configs)


def test_the_searched_hyper_parameters_are_member_fields(world, tmp_path):
    path = world[0]
    cfgs = configs(path, tmp_path, "triplet", "dvml", "key")
    assert len({group_key(c) for c in cfgs}) == 1
    other = FitConfig(**{**cfgs[0].to_dict(), "samples": 8})  # a shape: never a member field
    assert group_key(other) != group_key(cfgs[0])


@pytest.mark.parametrize(("loss", "arm"), CASES)
def test_members_with_their_own_hyper_parameters_are_their_one_by_one_fits(world, one_by_one, tmp_path, loss,
                                                                           arm):
    path, train, test = world
    outs = fit_stacked(configs(path, tmp_path, loss, arm, "st"), train=train, test=test)
    ref = one_by_one[(loss, arm)]
    assert mismatches(outs, ref) == []
    for a, b, member in zip(outs, ref, MEMBERS, strict=True):
        ca, cb = torch.load(a / R.HEADS_FILE, weights_only=True), torch.load(b / R.HEADS_FILE, weights_only=True)
        for k in ca["model"]:
            torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=1e-4, atol=1e-6)
        sa, sb = ca["resume"]["optimizer"], cb["resume"]["optimizer"]
        assert sa["param_groups"] == sb["param_groups"] and sa["param_groups"][0]["lr"] == member["lr"]
        for j in sb["state"]:
            for k in ("exp_avg", "exp_avg_sq"):  # relative to the tensor's norm: an element near 0 is all rounding
                diff = float((sa["state"][j][k] - sb["state"][j][k]).norm())
                assert diff <= 1e-4 * float(sb["state"][j][k].norm()), (a.name, j, k, diff)
            assert float(sa["state"][j]["step"]) == float(sb["state"][j]["step"])


_SETUP = StackedFit._optimizer_setup


def _shared_lr(self):
    """Mutation: every member trains at member 0's lr."""
    cfgs = self.cfgs
    self.cfgs = [FitConfig(**{**c.to_dict(), "lr": cfgs[0].lr}) for c in cfgs]
    try:
        _SETUP(self)
    finally:
        self.cfgs = cfgs


def _shared_lambdas(self, time_):
    """Mutation: every member weighs its terms with member 0's λ."""
    return self.cfgs[0].lambdas(time_)


@pytest.mark.parametrize("mutation", ["lr", "lambdas", "margin"])
def test_members_sharing_one_value_break_the_match(world, one_by_one, tmp_path, monkeypatch, mutation):
    path, train, test = world
    if mutation == "lr":
        monkeypatch.setattr(StackedFit, "_optimizer_setup", _shared_lr)
    elif mutation == "lambdas":
        monkeypatch.setattr(StackedFit, "lambdas", _shared_lambdas)
    else:  # the margin is the one value _per_member spreads
        monkeypatch.setattr(StackedFit, "_per_member", lambda self, values: values[0])
    outs = fit_stacked(configs(path, tmp_path, "triplet", "dvml", f"mut-{mutation}"), train=train, test=test)
    bad = mismatches(outs, one_by_one[("triplet", "dvml")])
    assert bad and all("-m0-" not in b for b in bad), bad  # member 0 is unchanged, the others are not
