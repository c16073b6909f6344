"""`dvml fit-heads` end to end through typer's CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dvml.cli import app

runner = CliRunner()
FAST = ["--embedding-size", "16", "--decoder-hidden", "16", "-T", "3", "--batch-size", "16", "--lr", "3e-3",
        "--phase2-epoch", "1", "--kl-warmup-epochs", "1", "--eval-every", "1"]


def test_fit_heads_end_to_end(tmp_path):
    cache = tmp_path / "w.h5"
    r = runner.invoke(app, ["synth", str(cache), "--classes", "16", "--images-per-class", "8", "--views", "2",
                            "--feature-dim", "32", "--class-dim", "16"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    r = runner.invoke(app, ["fit-heads", str(cache), "--out", str(out), "--epochs", "2", "--loss", "npair",
                            "--batch-size", "8", *FAST[:6], *FAST[8:]])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "test R@1" in r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["loss"] == "npair" and cfg["config"]["per_class"] == 2 and cfg["status"] == "finished"
    assert len((out / "log.jsonl").read_text().splitlines()) == 2

    again = runner.invoke(app, ["fit-heads", str(cache), "--out", str(out), "--epochs", "2"])
    assert again.exit_code == 1 and "--overwrite" in again.output
    both = runner.invoke(app, ["fit-heads", str(cache), "--out", str(out), "--resume", "--overwrite"])
    assert both.exit_code == 1 and "pass one of them" in both.output
    assert json.loads((out / "config.json").read_text())["status"] == "finished"  # untouched

    # --epochs 10 with phase 2 from epoch 30 (the default): one warning at the start naming both, in config.json
    short = runner.invoke(app, ["fit-heads", str(cache), "--out", str(tmp_path / "short"), "--epochs", "10",
                                *FAST[:8], "--kl-warmup-epochs", "1", "--eval-every", "0"])
    assert short.exit_code == 0, short.output
    said = " ".join(short.output.split())
    assert said.count("phase 2 never starts") == 1 and "phase2_epoch 30 >= epochs 10" in said
    assert said.count("WARNING") == 1  # one warning (the KL warm-up, 1 epoch here, ends)
    assert said.index("phase 2 never starts") < said.index("wrote")
    warned = json.loads((tmp_path / "short" / "config.json").read_text())["warnings"]
    assert len(warned) == 1 and "phase2_epoch 30 >= epochs 10" in warned[0]
    assert json.loads((out / "config.json").read_text())["warnings"] == []  # a two-phase fit: none

    base = runner.invoke(app, ["fit-heads", str(cache), "--out", str(tmp_path / "base"), "--no-dvml", "--epochs",
                               "1", *FAST, "--lambdas-phase2", "0.5,1,0.3,0.5"])
    assert base.exit_code == 0, base.output
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    assert cfg["config"]["dvml"] is False and cfg["config"]["lambdas_phase2"] == [0.5, 1.0, 0.3, 0.5]


def test_fit_heads_errors_are_one_line(tmp_path):
    r = runner.invoke(app, ["fit-heads", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "r")])
    assert r.exit_code == 1 and "error:" in r.output and "missing.h5" in r.output
    r = runner.invoke(app, ["fit-heads", "x.h5", "--out", str(tmp_path / "r"), "--lambdas-phase1", "1,2"])
    assert r.exit_code == 1 and "--lambdas-phase1" in r.output


def test_help_shows_the_defaults():
    r = runner.invoke(app, ["fit-heads", "--help"], terminal_width=200)
    assert r.exit_code == 0
    for text in ("--no-dvml", "--resume", "--overwrite", "--val-classes", "1,1,0.1,1", "0.0001",
                 "--recon-share", "0.8,1,0.2,0.8"):  # the last: the phase-2 weights (the paper's, the default)
        assert text in r.output, text


def test_fit_heads_branch_options_are_recorded_and_checked(tmp_path):
    """The DVML objective's options reach the run (config.json) and the log (diagnostics); bad values are
    one-line errors."""
    cache = tmp_path / "w.h5"
    assert runner.invoke(app, ["synth", str(cache), "--classes", "12", "--images-per-class", "6", "--views", "2",
                               "--feature-dim", "32", "--class-dim", "16"]).exit_code == 0
    out = tmp_path / "paper"
    r = runner.invoke(app, ["fit-heads", str(cache), "--out", str(out), "--epochs", "2", *FAST,
                            "--variance-space", "raw", "--variance-scale", "unit", "--likelihood", "l2",
                            "--reduction", "mean", "--triplet-input", "--batch-size", "15", "--diag-images", "30",
                            "--synthetic-pairs", "cross"])
    assert r.exit_code == 0, r.output
    c = json.loads((out / "config.json").read_text())["config"]
    assert (c["variance_space"], c["variance_scale"], c["likelihood"], c["reduction"], c["metric_reduction"],
            c["triplet_input"], c["synthetic_pairs"]) == ("raw", "unit", "l2", "mean", "nonzero", True, "cross")
    rec = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert {"active_frac", "syn_consistency", "grad_cos_invariant"} <= set(rec)
    default = runner.invoke(app, ["fit-heads", str(cache), "--out", str(tmp_path / "d"), "--epochs", "1", *FAST])
    assert default.exit_code == 0, default.output
    c = json.loads((tmp_path / "d" / "config.json").read_text())["config"]
    assert (c["variance_space"], c["variance_scale"], c["likelihood"], c["reduction"], c["metric_reduction"],
            c["synthetic_pairs"]) == ("normalized", "class", "gaussian", "sum", "sum", "within")
    assert c["recon_share"] == 1.0 and c["lambdas_phase2"] == [0.8, 1.0, 0.2, 0.8]
    r = runner.invoke(app, ["fit-heads", str(cache), "--out", str(tmp_path / "k"), "--epochs", "2", *FAST,
                            "--recon-share", "4"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "k" / "config.json").read_text())["config"]["recon_share"] == 4.0
    phase1, phase2 = (json.loads(line) for line in (tmp_path / "k" / "log.jsonl").read_text().splitlines())
    assert phase1["lambda_kl"] == 0.0 and phase2["phase"] == 2 and phase2["lambda_kl"] == 4 * 0.8
    r = runner.invoke(app, ["fit-heads", str(cache), "--out", str(tmp_path / "bad"), "--recon-share", "0"])
    assert r.exit_code == 1 and "recon_share must be > 0" in r.output and "Traceback" not in r.output, r.output
    r = runner.invoke(app, ["fit-heads", str(cache), "--out", str(tmp_path / "bad"), "--loss", "npair",
                            "--triplet-input"])
    assert r.exit_code == 1 and "--triplet-input" in r.output and "Traceback" not in r.output, r.output
    r = runner.invoke(app, ["fit-heads", str(cache), "--out", str(tmp_path / "bad"), "--loss", "proxy-nca-pp",
                            "--synthetic-pairs", "cross"])
    assert r.exit_code == 1 and "--synthetic-pairs cross" in r.output and "Traceback" not in r.output, r.output
    # the choices are enums: typer itself refuses a value outside them (usage error, exit 2) and lists them
    for option, bad, choices in (("--likelihood", "laplace", ("l2", "gaussian")),
                                 ("--variance-space", "x", ("raw", "normalized")),
                                 ("--variance-scale", "batch", ("unit", "class")),
                                 ("--metric-reduction", "max", ("nonzero", "sum", "mean")),
                                 ("--synthetic-pairs", "both", ("within", "cross"))):
        r = runner.invoke(app, ["fit-heads", str(cache), "--out", str(tmp_path / "bad"), option, bad])
        assert r.exit_code == 2 and option in r.output and "Traceback" not in r.output, r.output
        assert all(f"'{c}'" in r.output for c in choices), r.output
    assert not (tmp_path / "bad").exists()
