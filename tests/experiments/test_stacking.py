"""``dvml ablate`` stacked (the default) against ``--no-stack``: the same cells, files and numbers; the stacks it
forms, the cells it fits one by one (reason logged), ``--stack-size``, and resuming after a SIGKILL mid-stack."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dvml import runs as R
from dvml.cli import app
from dvml.experiments import ablate, stacking
from dvml.extract.synth import SynthConfig, generate

runner = CliRunner()
FIT = {"epochs": 2, "embedding_size": 16, "decoder_hidden": 16, "samples": 2, "eval_every": 1, "device": "cpu",
       "lr": 1e-3}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return generate(SynthConfig(n_classes=24, images_per_class=8, views=2, feature_dim=32, class_dim=8,
                                variation_dim=4, hidden_dim=16), tmp_path_factory.mktemp("stk") / "w.h5")


def grid(cache, out, **kw):
    return ablate.AblateConfig(cache=cache, out=out, losses=("triplet", "npair"), seeds=(0, 1, 2),
                               fit={**FIT, "batch_size": 16}, clustering=False, **kw)


@pytest.fixture(scope="module")
def both(cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("both")
    st = ablate.run(grid(cache, root / "st"))
    one = ablate.run(grid(cache, root / "one", stack=False))
    return st, one


def trainer(run_dir) -> str:
    return json.loads((Path(run_dir) / R.CONFIG_FILE).read_text())["trainer"]


def test_stacked_grid_matches_the_one_by_one_grid(both):
    st, one = both
    assert [(r["loss"], r["dvml"], r["seed"]) for r in st["rows"]] == [(r["loss"], r["dvml"], r["seed"])
                                                                        for r in one["rows"]]
    for a, b in zip(st["rows"], one["rows"], strict=True):
        assert abs(a["recall@1"] - b["recall@1"]) <= 0.005 and a["map@r"] == pytest.approx(b["map@r"], abs=0.005)
        assert trainer(a["run_dir"]) == "stacked" and trainer(b["run_dir"]) == "one-by-one"
        for name in (R.HEADS_FILE, R.LOG_FILE, R.METRICS_FILE, ablate.PER_CLASS_FILE):
            assert (Path(a["run_dir"]) / name).exists()
        la, lb = R.read_log(a["run_dir"]), R.read_log(b["run_dir"])
        for k in ("kl", "recon", "metric_invariant", "metric_synthetic", "total"):
            assert la[0][k] == pytest.approx(lb[0][k], rel=1e-5, abs=1e-12)
    for loss in ("triplet", "npair"):
        for m in ("baseline", "DVML"):
            a = st["losses"][loss]["metrics"]["recall@1"][m]["mean"]
            b = one["losses"][loss]["metrics"]["recall@1"][m]["mean"]
            assert abs(a - b) <= 0.002
    assert stacking.trainer_counts(st["rows"]) == {"stacked": 12}


def test_plan_stacks_by_loss_and_method_and_falls_back_with_a_reason(cache, tmp_path, caplog):
    cfg = ablate.AblateConfig(cache=cache, out=tmp_path / "p", losses=("triplet", "proxy-nca"), seeds=(0, 1, 2),
                              fit={**FIT, "batch_size": 16}, stack_size=2)
    units = stacking.plan(cfg, cfg.cells())
    names = [([c.name for c in u], why) for u, why in units]
    assert (["triplet-base-s0", "triplet-base-s1"], None) in names
    assert (["triplet-dvml-s0", "triplet-dvml-s1"], None) in names
    assert (["triplet-base-s2"], "no other cell to stack it with") in names
    assert all(why and "proxy-nca" in why for u, why in names if u[0].startswith("proxy-nca"))
    assert sorted(c for u, _ in names for c in u) == sorted(c.name for c in cfg.cells())
    assert all(why == "--no-stack" for _, why in stacking.plan(grid(cache, tmp_path / "n", stack=False),
                                                               cfg.cells()))
    big = ablate.AblateConfig(cache=cache, out=tmp_path / "b", losses=("triplet",), seeds=(0, 1),
                              fit={**FIT, "batch_size": 16, "samples": 20, "decoder_hidden": 4096})
    assert [why for _, why in stacking.plan(big, big.cells())] == [None] + [
        f"on the CPU a DVML fit of {20 * 16 * 4096:,} decoder activations per step is arithmetic-bound and measured "
        f"slower stacked (limit {stacking.CPU_STACK_MAX_ACTIVATIONS:,})"] * 2
    with caplog.at_level(logging.WARNING, logger="dvml.experiments.stacking"):
        out = ablate.run(ablate.AblateConfig(cache=cache, out=tmp_path / "r", losses=("triplet", "proxy-nca"),
                                             seeds=(0, 1), methods=("base",), clustering=False,
                                             fit={**FIT, "batch_size": 16, "epochs": 1}))
    assert any("fitted one by one" in r.message and "proxy-nca" in r.message for r in caplog.records)
    assert {r["loss"]: trainer(r["run_dir"]) for r in out["rows"]} == {"triplet": "stacked",
                                                                        "proxy-nca": "one-by-one"}


def test_cli_stack_options(cache, tmp_path):
    r = runner.invoke(app, ["ablate", str(cache), "--out", str(tmp_path / "c"), "--losses", "npair", "--seeds", "2",
                            "--methods", "dvml", "--epochs", "1", "--batch-size", "16", "--embedding-size", "16",
                            "--samples", "2", "--eval-every", "0", "--device", "cpu", "--set", "decoder_hidden=16",
                            "--no-clustering", "--no-stack"])
    assert r.exit_code == 0, r.output
    assert trainer(tmp_path / "c" / "runs" / "npair-dvml-s0") == "one-by-one"
    prov = json.loads((tmp_path / "c" / ablate.PROVENANCE_FILE).read_text())
    assert prov["config"]["stack"] is False
    r = runner.invoke(app, ["ablate", str(cache), "--out", str(tmp_path / "d"), "--stack-size", "1"])
    assert r.exit_code != 0 and "stack-size" in r.output
    r = runner.invoke(app, ["ablate", "--help"])
    assert "--no-stack" in r.output and "--stack-size" in r.output


def test_resume_after_sigkill_mid_stack(cache, both, tmp_path):
    """SIGKILL a real ``dvml ablate`` while its first stack trains; running the command again refits the unfinished
    cells (stacked) and ends with the uninterrupted grid's numbers."""
    out = tmp_path / "k"
    args = ["ablate", str(cache), "--out", str(out), "--losses", "triplet,npair", "--seeds", "3", "--epochs", "40",
            "--batch-size", "16", "--embedding-size", "16", "--samples", "2", "--eval-every", "1", "--device", "cpu",
            "--lr", "0.001", "--set", "decoder_hidden=16", "--no-clustering"]
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", "from dvml.cli import main; main()", *args], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "runs" / "triplet-base-s0" / R.LOG_FILE
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and p.poll() is None:
            if first.exists() and first.read_text().count("\n") >= 2:
                break
            time.sleep(0.02)
        assert p.poll() is None, f"ablate ended before it could be killed: {p.stderr.read().decode()[-2000:]}"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(30)
    assert not (out / "runs" / "triplet-base-s0" / R.METRICS_FILE).exists()
    args[args.index("--epochs") + 1] = "2"  # the schedule is a fit option: an unfinished grid restarts with it
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = ablate.read_results_csv(out / ablate.RESULTS_FILE)
    ref = {(r["loss"], r["dvml"], r["seed"]): r for r in both[1]["rows"]}
    assert len(rows) == 12
    for row in rows:
        assert trainer(row["run_dir"]) == "stacked"
        assert abs(row["recall@1"] - ref[(row["loss"], row["dvml"], row["seed"])]["recall@1"]) <= 0.005


def test_a_grid_with_the_noise_arm_stacks_it_as_its_one_by_one_grid(cache, tmp_path):
    """``--methods base,dvml,noise`` with 2 seeds: the noise cells train as one stack (``"trainer": "stacked"``,
    never with the DVML cells) and end with ``--no-stack``'s numbers: every epoch's terms within 1e-5 relative (KL 0)
    and Recall@1 within 0.5 points."""
    args = ["--losses", "triplet,npair", "--seeds", "2", "--methods", "base,dvml,noise", "--epochs", "2",
            "--batch-size", "16", "--embedding-size", "16", "--samples", "2", "--eval-every", "1", "--device", "cpu",
            "--lr", "0.001", "--set", "decoder_hidden=16", "--no-clustering"]
    for name, extra in (("st", []), ("one", ["--no-stack"])):
        r = runner.invoke(app, ["ablate", str(cache), "--out", str(tmp_path / name), *args, *extra])
        assert r.exit_code == 0, r.output
    st, one = (ablate.read_results_csv(tmp_path / name / ablate.RESULTS_FILE) for name in ("st", "one"))
    key = [(r["loss"], r["method"], r["seed"]) for r in one]
    assert [(r["loss"], r["method"], r["seed"]) for r in st] == key and len(key) == 12
    assert {m for _, m, _ in key} == {"base", "dvml", "noise"}
    for a, b in zip(st, one, strict=True):
        conf = json.loads((Path(a["run_dir"]) / R.CONFIG_FILE).read_text())
        assert conf["trainer"] == "stacked" and trainer(b["run_dir"]) == "one-by-one"
        assert conf["config"]["variance_source"] == ("noise" if a["method"] == "noise" else "learned")
        if a["method"] == "noise":  # its stack holds the two noise cells of its loss, no DVML cell
            assert conf["stack"]["members"] == [f"{a['loss']}-noise-s0", f"{a['loss']}-noise-s1"]
        assert abs(a["recall@1"] - b["recall@1"]) <= 0.005, (a["run_dir"], a["recall@1"], b["recall@1"])
        la, lb = R.read_log(a["run_dir"]), R.read_log(b["run_dir"])
        assert len(la) == len(lb) == 2
        for ra, rb in zip(la, lb, strict=True):
            for k in ("kl", "recon", "metric_invariant", "metric_synthetic", "total"):
                assert abs(ra[k] - rb[k]) <= 1e-5 * max(abs(rb[k]), 1e-12), (a["run_dir"], ra["epoch"], k)
            if a["method"] == "noise":
                assert ra["kl"] == 0.0 and ra["recon"] > 0
