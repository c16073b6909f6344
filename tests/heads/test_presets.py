"""fit-heads --preset paper|dvml: the paper's settings for every option not given, recorded in config.json."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dvml.cli import app
from dvml.heads.config import PAPER_PHASE2_LAMBDAS, PHASE2_LAMBDAS

runner = CliRunner()
FAST = ["--epochs", "1", "--embedding-size", "16", "--decoder-hidden", "16", "-T", "2", "--batch-size", "16",
        "--eval-every", "0", "--diag-images", "0", "--grad-every", "0"]


def _cfg(tmp_path, name, *args):
    cache = tmp_path / "w.h5"
    if not cache.exists():
        assert runner.invoke(app, ["synth", str(cache), "--classes", "16", "--images-per-class", "8", "--views", "2",
                                   "--feature-dim", "32", "--class-dim", "16"]).exit_code == 0
    r = runner.invoke(app, ["fit-heads", str(cache), "--out", str(tmp_path / name), *FAST, *args])
    assert r.exit_code == 0, r.output
    return json.loads((tmp_path / name / "config.json").read_text())["config"]


def test_paper_preset_reverts_every_deviation_and_is_recorded(tmp_path):
    dflt = _cfg(tmp_path, "d")
    assert dflt["preset"] == "dvml" and dflt["lambdas_phase2"] == list(PHASE2_LAMBDAS)
    paper = _cfg(tmp_path, "p", "--preset", "paper")
    assert paper["preset"] == "paper" and paper["lambdas_phase2"] == list(PAPER_PHASE2_LAMBDAS)
    assert (paper["recon_share"], paper["likelihood"], paper["variance_space"], paper["variance_scale"],
            paper["metric_grad_to_variance"]) == (1.0, "l2", "raw", "unit", True)
    assert (dflt["likelihood"], dflt["variance_scale"], dflt["metric_grad_to_variance"]) == ("gaussian", "class",
                                                                                             False)
    mixed = _cfg(tmp_path, "m", "--preset", "paper", "--recon-share", "2", "--likelihood", "gaussian")
    assert mixed["recon_share"] == 2.0 and mixed["likelihood"] == "gaussian" and mixed["variance_scale"] == "unit"
    r = runner.invoke(app, ["fit-heads", str(tmp_path / "w.h5"), "--out", str(tmp_path / "x"), "--preset", "paperish"])
    assert r.exit_code == 2 and "paperish" in r.output
    assert not (tmp_path / "x").exists()
