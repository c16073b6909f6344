"""The noise control arm (``variance_source="noise"``): z_V is N(0, I) at DVML's scale, no encoder, KL 0, the
decoder and reconstruction kept; recorded in config.json and fit by fit-heads."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dvml.cli import app
from dvml.heads.config import FitConfig, HeadsConfig, VarianceSource
from dvml.heads.model import DVMLHeads
from dvml.heads.objective import kl_term

D, E, T, B = 12, 6, 5, 8


def _pair(**kw):
    torch.manual_seed(0)
    learned = DVMLHeads(D, E, 8, variance_scale="class", variance_space="normalized", **kw).double()
    torch.manual_seed(0)
    noise = DVMLHeads(D, E, 8, variance_scale="class", variance_space="normalized", variance_source="noise",
                      **kw).double()
    return learned, noise


def test_noise_arm_has_no_encoder_and_draws_isotropic_noise_at_dvmls_scale():
    learned, noise = _pair()
    names = {n for n, _ in noise.named_parameters()}
    assert names == {"embedding.weight", "embedding.bias", "decoder.hidden.weight", "decoder.hidden.bias",
                     "decoder.out.weight", "decoder.out.bias"}
    torch.testing.assert_close(noise.embedding.weight, learned.embedding.weight)  # same seed, same z_I layer
    x = torch.rand(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    eps = torch.randn(T, B, E, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = noise(x, eps=eps, labels=y)
    base = torch.nn.functional.normalize(noise.embedding(x), dim=-1)
    s = noise.zv_scale(base, y)
    torch.testing.assert_close(out.z_syn, base + s * eps)  # an independent reading of the arm: base + s·ε
    assert float(kl_term(out.mu, out.logvar)) == 0.0 and not out.mu.requires_grad
    # the learned arm draws from μ(x) + σ(x)·ε instead: the same ε gives other samples
    assert not torch.allclose(learned(x, eps=eps, labels=y).z_syn, out.z_syn)
    # phase 2: the reconstruction still trains z_I (the decoder's input carries its gradient), as in DVML
    noise.zero_grad()
    out = noise(x, eps=eps, labels=y)
    ((out.x_hat - x) ** 2).sum().backward()
    assert float(noise.embedding.weight.grad.abs().sum()) > 0


def test_variance_source_is_validated_recorded_and_read_back(tmp_path):
    cfg = FitConfig(cache=tmp_path / "c.h5", out=tmp_path / "r", variance_source="noise")
    assert cfg.variance_source is VarianceSource.noise and cfg.to_dict()["variance_source"] == "noise"
    assert cfg.heads_kwargs()["variance_source"] is VarianceSource.noise
    old = {k: v for k, v in cfg.to_dict().items() if k != "variance_source"}  # a config recorded before the arm
    assert FitConfig.from_dict(old).variance_source is VarianceSource.learned
    with pytest.raises(ValueError, match="^variance_source must be one of learned, noise"):
        HeadsConfig(variance_source="gauss")


def test_fit_heads_fits_the_noise_arm(tmp_path):
    runner = CliRunner()
    cache = tmp_path / "w.h5"
    assert runner.invoke(app, ["synth", str(cache), "--classes", "16", "--images-per-class", "8", "--views", "2",
                               "--feature-dim", "32", "--class-dim", "16"]).exit_code == 0
    r = runner.invoke(app, ["fit-heads", str(cache), "--out", str(tmp_path / "n"), "--variance-source", "noise",
                            "--epochs", "2", "--phase2-epoch", "1", "--kl-warmup-epochs", "1", "--embedding-size",
                            "16", "--decoder-hidden", "16", "-T", "3", "--batch-size", "16", "--eval-every", "0"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "n" / "config.json").read_text())["config"]
    assert cfg["variance_source"] == "noise" and cfg["dvml"] is True
    log = [json.loads(line) for line in (tmp_path / "n" / "log.jsonl").read_text().splitlines()]
    assert all(rec["kl"] == 0.0 for rec in log) and log[-1]["recon"] > 0 and log[-1]["phase"] == 2
    bad = runner.invoke(app, ["fit-heads", str(cache), "--out", str(tmp_path / "b"), "--variance-source", "x"])
    assert bad.exit_code != 0
