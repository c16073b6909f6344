"""Loss parameters (--margin, --gamma, --temperature, --label-smoothing): resolution, validation, and that
they reach the loss that is trained (checked against pytorch-metric-learning and the run's checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dvml.cli import app
from dvml.heads import FitConfig
from dvml.losses import LOSS_PARAM_DEFAULTS, LossName, make_metric_loss
from dvml.losses import dr as dr_losses
from dvml.losses.metric import pml_reference


def test_defaults_are_the_loss_modules_own():
    assert LOSS_PARAM_DEFAULTS[LossName.dr_triplet] == {"margin": dr_losses.DR_TRIPLET_MARGIN,
                                                       "gamma": dr_losses.DR_TRIPLET_GAMMA}
    assert LOSS_PARAM_DEFAULTS[LossName.proxy_nca_pp]["temperature"] == dr_losses.PROXY_NCA_PP_TEMPERATURE


def test_fit_config_resolves_and_validates(tmp_path):
    cfg = FitConfig(cache="c.h5", out=tmp_path, loss="triplet")
    assert (cfg.margin, cfg.gamma, cfg.temperature) == (0.2, None, None)
    assert cfg.loss_params() == {"margin": 0.2}
    dr = FitConfig(cache="c.h5", out=tmp_path, loss="dr-triplet", gamma=0)
    assert dr.loss_params() == {"margin": 0.278, "gamma": 0.0}
    assert FitConfig(cache="c.h5", out=tmp_path, loss="npair").loss_params() == {}
    with pytest.raises(ValueError, match="^margin does not apply to loss npair \\(its parameters: none\\)$"):
        FitConfig(cache="c.h5", out=tmp_path, loss="npair", margin=0.1)
    with pytest.raises(ValueError, match="^gamma does not apply to loss triplet \\(its parameters: margin\\)$"):
        FitConfig(cache="c.h5", out=tmp_path, loss="triplet", gamma=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        FitConfig(cache="c.h5", out=tmp_path, loss="proxy-nca-pp", label_smoothing=1.0)
    with pytest.raises(ValueError, match="temperature"):
        FitConfig(cache="c.h5", out=tmp_path, loss="proxy-nca-pp", temperature=0)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        FitConfig(cache="c.h5", out=tmp_path, loss="triplet", margin=-0.1)
    # the resolved values round-trip through the recorded config
    assert FitConfig.from_dict(dr.to_dict()) == dr


@pytest.mark.parametrize("name", ["triplet", "contrastive", "lifted"])
def test_margin_reaches_the_loss(name):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(24, 8, generator=g)
    labels = torch.arange(6).repeat_interleave(4)
    ours = make_metric_loss(name, num_classes=6, embedding_size=8, margin=0.45)(z, labels)
    ref, _ = pml_reference(name, num_classes=6, embedding_size=8, margin=0.45)
    default_ref, _ = pml_reference(name, num_classes=6, embedding_size=8)
    assert ours.item() == pytest.approx(ref(z, labels).item(), rel=1e-5)
    assert ref(z, labels).item() != pytest.approx(default_ref(z, labels).item(), rel=1e-3)


def test_dr_and_proxy_nca_pp_parameters_reach_the_modules():
    dr = make_metric_loss("dr-triplet", num_classes=4, embedding_size=8, gamma=0.1, margin=0.3).loss
    assert (dr.margin, dr.gamma) == (0.3, 0.1)
    assert make_metric_loss("dr-proxy-nca", num_classes=4, embedding_size=8, gamma=0.0).loss.gamma == 0.0
    pp = make_metric_loss("proxy-nca-pp", num_classes=4, embedding_size=8, temperature=0.5, label_smoothing=0).loss
    assert (pp.temperature, pp.label_smoothing) == (0.5, 0.0)
    with pytest.raises(ValueError, match="takes no parameter"):
        make_metric_loss("npair", num_classes=4, embedding_size=8, margin=0.1)


def test_cli_options_reach_the_run(tiny_cache, tmp_path):
    runner = CliRunner()
    fast = ["--embedding-size", "16", "--decoder-hidden", "16", "-T", "2", "--batch-size", "16", "--epochs", "1",
            "--eval-every", "0"]
    out = tmp_path / "dr"
    r = runner.invoke(app, ["fit-heads", str(tiny_cache), "--out", str(out), "--loss", "dr-triplet",
                            "--gamma", "0.25", *fast])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["loss"], cfg["margin"], cfg["gamma"], cfg["temperature"]) == ("dr-triplet", 0.278, 0.25, None)
    bad = runner.invoke(app, ["fit-heads", str(tiny_cache), "--out", str(tmp_path / "np"), "--loss", "npair",
                              "--margin", "0.3", *fast])
    assert bad.exit_code == 1 and "--margin does not apply to --loss npair" in bad.output
    assert not (tmp_path / "np").exists()
    for command in ("fit-heads", "finetune"):
        r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "240"})
        text = " ".join(r.output.replace("│", " ").split())  # rich wraps help text in a box
        assert "--label-smoothing" in text and "--gamma" in text and "dr-triplet 0.492" in text, command
