"""``dvml ablate | analyze | tune`` through typer's CliRunner on a tiny synth cache (``demo``: tests/test_demo.py)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dvml.cli import app
from dvml.experiments import ablate, tune
from dvml.extract.synth import SynthConfig, generate
from dvml.heads import FitConfig

runner = CliRunner()
FIT_ARGS = ["--epochs", "1", "--batch-size", "12", "--embedding-size", "16", "--samples", "2", "--device", "cpu",
            "--set", "decoder_hidden=16"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return generate(SynthConfig(n_classes=20, images_per_class=6, views=2, feature_dim=32, class_dim=8,
                                variation_dim=4, hidden_dim=16), tmp_path_factory.mktemp("cli") / "w.h5")


@pytest.fixture(scope="module")
def ablation(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "abl"
    r = runner.invoke(app, ["ablate", str(cache), "--out", str(out), "--losses", "triplet", "--seeds", "2",
                            "--eval-every", "0", *FIT_ARGS])
    return out, r


def test_ablate_prints_the_table_and_resumes(ablation, cache):
    out, r = ablation
    assert r.exit_code == 0, r.output
    assert "w.h5: triplet" in r.stdout and "baseline (n=2)" in r.stdout and "Δ DVML−base [95% CI]" in r.stdout
    assert "results.csv" in r.stdout
    rows = ablate.read_results_csv(out / ablate.RESULTS_FILE)
    assert len(rows) == 4
    prov = json.loads((out / ablate.PROVENANCE_FILE).read_text())
    assert prov["fit"] == {"epochs": 1, "batch_size": 12, "embedding_size": 16, "samples": 2, "eval_every": 0,
                           "device": "cpu", "decoder_hidden": 16}
    # the live table went to stderr, the results to stdout; a second run finds every cell done
    again = runner.invoke(app, ["ablate", str(cache), "--out", str(out), "--losses", "triplet", "--seeds", "2",
                                "--eval-every", "0", *FIT_ARGS])
    assert again.exit_code == 0, again.output
    assert "done before" in again.output
    assert ablate.read_results_csv(out / ablate.RESULTS_FILE) == rows
    # the schedule warning (1 epoch, phase 2 from epoch 30): once for the grid, not per cell; none when every
    # cell was done before
    said = " ".join(r.output.split())
    assert said.count("phase 2 never starts") == 1 and "phase2_epoch 30 >= epochs 1" in said
    assert said.count("the KL warm-up never ends") == 1 and "[2 of 4 cells" in said  # the DVML cells only
    assert said.count("WARNING") == 1
    assert "never starts" not in again.output and "never ends" not in again.output


def test_ablate_errors_are_one_line(cache, tmp_path):
    r = runner.invoke(app, ["ablate", str(cache), "--out", str(tmp_path / "x"), "--set", "nonsense=1"])
    assert r.exit_code == 1 and "not a fit option" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["ablate", str(cache), "--out", str(tmp_path / "x"), "--methods", "dvml,other"])
    assert r.exit_code == 1 and "--methods" in r.output
    r = runner.invoke(app, ["ablate", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "y")])
    assert r.exit_code == 1 and "missing.h5" in r.output
    # one option given two ways: refused, not one of them silently winning
    r = runner.invoke(app, ["ablate", str(cache), "--out", str(tmp_path / "z"), "--epochs", "1", "--set", "epochs=5"])
    assert r.exit_code == 1 and "--set epochs=5 conflicts with --epochs 1" in r.output
    r = runner.invoke(app, ["ablate", str(cache), "--out", str(tmp_path / "z"), "--set", "lr=0.1", "--set", "lr=0.2"])
    assert r.exit_code == 1 and "--set lr is given twice" in r.output
    r = runner.invoke(app, ["tune", str(cache), "--out", str(tmp_path / "t"), "--epochs", "2", "--set", "epochs=3"])
    assert r.exit_code == 1 and "conflicts with --epochs 2" in r.output
    assert not (tmp_path / "z").exists() and not (tmp_path / "t").exists()


def test_analyze_compares_dvml_with_baseline(ablation, tmp_path):
    out, _ = ablation
    runs = out / "runs"
    r = runner.invoke(app, ["analyze", str(runs / "triplet-dvml-s0"), "--baseline", str(runs / "triplet-base-s0"),
                            "--out", str(tmp_path / "an"), "--no-tsne", "--plot-points", "40"])
    assert r.exit_code == 0, r.output
    assert "KS p" in r.stdout and "run: triplet+DVML" in r.stdout and "baseline: triplet" in r.stdout
    saved = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert set(saved["splits"]) == {"train", "test"}
    # the branch diagnostics with their acceptance checks, for both runs (checks only for DVML)
    assert "run: DVML branch diagnostics" in r.stdout and "baseline: DVML branch diagnostics" in r.stdout
    assert "active units" in r.stdout and "class consistency of z_hat" in r.stdout  # (1 epoch: no phase 2)
    branch = saved["dvml_branch"]
    assert set(branch["run"]["checks"]) == {"active_frac", "kl_sum", "consistency_vs_noise", "hardness_vs_noise",
                                            "grad_vs_noise"}
    assert branch["baseline"]["checks"] is None and "img_consistency" in branch["baseline"]["final"]
    # each learned-vs-noise check stands beside its own value and stated margin
    assert "learned - noise" in r.stdout and "cos_noise - cos_learned" in r.stdout
    hard = branch["run"]["checks"]["hardness_vs_noise"]
    row = next(line for line in r.stdout.splitlines() if "│   learned / noise " in line)
    assert f"{hard['value']:.4g}" in row and ("ok (>= 1.1)" if hard["ok"] else "FAIL (>= 1.1)") in row
    assert "(>=" not in next(line for line in r.stdout.splitlines() if "Lm(z_I) last epoch" in line)
    assert (tmp_path / "an" / "test_run_pca.png").exists() and not (tmp_path / "an" / "test_run_tsne.png").exists()
    bad = runner.invoke(app, ["analyze", str(runs / "triplet-dvml-s0"), "--splits", "val"])
    assert bad.exit_code == 1 and "splits" in bad.output
    missing = runner.invoke(app, ["analyze", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "nowhere: no such run directory or feature cache" in missing.output


def test_tune_writes_a_config_fit_heads_accepts(cache, tmp_path):
    out = tmp_path / "tune"
    r = runner.invoke(app, ["tune", str(cache), "--trials", "2", "--out", str(out), "--epochs", "1",
                            "--batch-size", "12", "--device", "cpu", "--set", "decoder_hidden=16",
                            "--search", "lr,samples"])
    assert r.exit_code == 0, r.output
    assert "best trial" in r.stdout and "trial 1:" in r.output
    assert "ETA" in r.output and "2/2" in r.output  # the overall progress bar (finished trials of the target)
    best = json.loads((out / tune.BEST_CONFIG_FILE).read_text())
    summary = json.loads((out / tune.SUMMARY_FILE).read_text())
    assert summary["search_space"] == ["lr", "samples"] and len(summary["trials"]) == 2
    assert best["samples"] == summary["best"]["params"]["samples"] and best["decoder_hidden"] == 16
    FitConfig.from_dict({**best, "cache": str(cache), "out": str(tmp_path / "run")})  # a valid fit config
    # fit-heads --config trains the winner; an option on the command line overrides the file
    run = tmp_path / "run"
    r = runner.invoke(app, ["fit-heads", str(cache), "--out", str(run), "--config", str(out / tune.BEST_CONFIG_FILE),
                            "--seed", "5"])
    assert r.exit_code == 0, r.output
    used = json.loads((run / "config.json").read_text())["config"]
    assert used["lr"] == pytest.approx(best["lr"]) and used["samples"] == best["samples"]
    assert used["epochs"] == 1 and used["decoder_hidden"] == 16 and used["seed"] == 5
    (tmp_path / "bad.json").write_text('{"epochz": 3}')
    r = runner.invoke(app, ["fit-heads", str(cache), "--out", str(tmp_path / "r2"), "--config",
                            str(tmp_path / "bad.json")])
    assert r.exit_code == 1 and "epochz" in r.output


def test_ablate_says_the_fitted_batch_once_for_the_grid(cache, tmp_path):
    """The default batch (120 for triplet) needs more classes than the 10 training classes: fitted, said once for
    the four cells (not once per cell, and not twice per cell as the check and the fit each did)."""
    args = ["ablate", str(cache), "--out", str(tmp_path / "a"), "--losses", "triplet", "--seeds", "2",
            "--eval-every", "0", "--epochs", "1", "--embedding-size", "8", "--samples", "2", "--device", "cpu",
            "--set", "decoder-hidden=8", "--set", "phase2-epoch=0", "--set", "kl-warmup-epochs=0", "--no-clustering"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert said.count("batch fitted to the data") == 1 and said.count("WARNING") == 1, said
    assert "(triplet-" not in said  # the cells' names are not in the grid's warning
