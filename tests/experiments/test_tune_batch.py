"""``dvml.experiments.tune_batch``: a study's trials asked in batches, those that can stack fitted as one model.

A stacked trial scores what its one-by-one fit scores; a batch whose trials differ in a shape falls back to one by
one with the reason logged; a failed stack is refitted one by one; an interrupted batch's trials are marked failed
and the study continues to its target; ``dvml tune --batch-trials`` end to end.
"""

from __future__ import annotations

import json
import logging

import optuna
import pytest
from typer.testing import CliRunner

from dvml.cli import app
from dvml.errors import DvmlError
from dvml.experiments import tune, tune_batch
from dvml.extract.synth import SynthConfig, generate

# phase 2 from the start (the searched λ act); samples and embedding size fixed, so every batch stacks
FIT = {"epochs": 1, "phase2_epoch": 0, "decoder_hidden": 16, "batch_size": 12, "eval_every": 1, "device": "cpu",
       "samples": 2, "embedding_size": 16}
SEARCH = ("lr", "margin", "lambda3", "recon_share")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune-batch") / "w.h5"
    return generate(SynthConfig(n_classes=20, images_per_class=6, views=2, feature_dim=32, class_dim=8,
                                variation_dim=4, hidden_dim=16), path)


def study_cfg(cache, out, **kw) -> tune.TuneConfig:
    return tune.TuneConfig(**{"cache": cache, "loss": "triplet", "trials": 4, "out": out, "fit": FIT,
                              "search": SEARCH, "batch_trials": 2, "keep_runs": True, **kw})


def trainers(out) -> list[str]:
    return [json.loads(p.read_text())["trainer"] for p in sorted((out / "trials").glob("*/config.json"))]


def test_stacked_trials_score_as_their_one_by_one_fits(cache, tmp_path):
    out = tmp_path / "t"
    result = tune.run(study_cfg(cache, out))
    done = [t for t in result["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 4 and {t["trainer"] for t in done} == {"stacked"}
    assert trainers(out) == ["stacked"] * 4
    assert len({t["params"]["lr"] for t in done}) == 4  # the members of each stack had their own lr
    assert (out / tune.BEST_CONFIG_FILE).exists() and result["batch_trials"] == 2
    # each trial's value is the value of its fit made one by one
    cfg = study_cfg(cache, tmp_path / "one")
    fit_classes, val_classes = tune.split_train_classes(tune.load_labels(cache, "train"), cfg.val_fraction, 0)
    train_all = tune.load_split(cache, "train")
    train, val = tune.subset(train_all, fit_classes), tune.subset(train_all, val_classes)
    for t in done:
        one = tune.fit_config(cfg, tune.params_to_fit(t["params"]), tmp_path / "one" / str(t["number"]))
        metrics = tune.fit_and_score(cfg, one, train, val)
        assert abs(metrics["recall@1"] - t["value"]) <= 0.005, t
        logged = json.loads((out / "trials" / f"{t['number']:04d}" / "config.json").read_text())["config"]
        assert logged == {**one.to_dict(), "out": logged["out"]}  # the stacked member had the trial's config


def test_plan_stacks_same_shapes_and_says_why_not(cache, tmp_path):
    cfg = study_cfg(cache, tmp_path)
    fits = [tune.fit_config(cfg, p, tmp_path / str(j)) for j, p in enumerate(
        [{"lr": 1e-3}, {"lr": 2e-3, "samples": 4}, {"lr": 3e-3, "recon_share": 2.0}, {"lr": 1e-4, "samples": 4}])]
    assert tune_batch.plan(fits, 32) == [([0, 2], None), ([1, 3], None)]
    assert tune_batch.plan(fits[:2], 32) == [([0], tune_batch.ALONE), ([1], tune_batch.ALONE)]
    proxy = tune.fit_config(tune.TuneConfig(cache=cache, loss="proxy-nca", out=tmp_path, fit=FIT), {}, tmp_path / "p")
    assert "no stacked form" in tune_batch.plan([proxy, proxy], 32)[0][1]


def test_shapes_that_differ_fall_back_with_a_logged_reason(cache, tmp_path, caplog):
    out = tmp_path / "t"
    with caplog.at_level(logging.INFO, logger="dvml.experiments.tune_batch"):
        result = tune.run(study_cfg(cache, out, search=("lr", "samples"), trials=3, batch_trials=3,
                                    fit={k: v for k, v in FIT.items() if k != "samples"}))
    by_trainer = {t["number"]: t["trainer"] for t in result["trials"]}
    samples = {t["number"]: t["params"]["samples"] for t in result["trials"]}
    for n, trainer in by_trainer.items():  # stacked exactly when another trial drew the same T
        assert trainer == ("stacked" if list(samples.values()).count(samples[n]) > 1 else "one-by-one"), result
    alone = [n for n, trainer in by_trainer.items() if trainer == "one-by-one"]
    assert alone and all(f"trial {n} fitted one by one: {tune_batch.ALONE}" in caplog.text for n in alone)


def test_a_failed_stack_is_refitted_one_by_one(cache, tmp_path, monkeypatch):
    import dvml.heads.stacked

    def fail(*a, **kw):
        raise DvmlError("non-finite loss (a member diverged)")

    monkeypatch.setattr(dvml.heads.stacked, "fit_stacked", fail)
    result = tune.run(study_cfg(cache, tmp_path / "t", trials=2))
    assert [t["trainer"] for t in result["trials"]] == ["one-by-one"] * 2
    assert [t["state"] for t in result["trials"]] == ["COMPLETE"] * 2


def test_an_interrupted_batch_fails_its_trials_and_the_study_resumes(cache, tmp_path, monkeypatch):
    out = tmp_path / "t"
    real_score, calls = tune.score, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:  # the second batch, after its stack was fitted
            raise KeyboardInterrupt
        return real_score(*a, **kw)

    monkeypatch.setattr(tune, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune.run(study_cfg(cache, out))
    monkeypatch.setattr(tune, "score", real_score)
    storage = optuna.storages.get_storage(study_cfg(cache, out).storage_url())
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    result = tune.run(study_cfg(cache, out))  # the same command again: continues to 4 finished trials
    states = [t["state"] for t in result["trials"]]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert json.loads((out / tune.BEST_CONFIG_FILE).read_text())["epochs"] == 1


def test_cli_batch_trials(cache, tmp_path):
    out = tmp_path / "tune"
    r = CliRunner().invoke(app, ["tune", str(cache), "--trials", "4", "--batch-trials", "2", "--out", str(out),
                                 "--epochs", "1", "--batch-size", "12", "--device", "cpu", "--set", "decoder_hidden=16",
                                 "--set", "samples=2", "--set", "embedding_size=16", "--search", "lr,recon_share",
                                 "--set", "phase2_epoch=0", "--keep-runs"])
    assert r.exit_code == 0, r.output
    assert "best trial" in r.stdout and "4/4" in r.output
    summary = json.loads((out / tune.SUMMARY_FILE).read_text())
    assert [t["trainer"] for t in summary["trials"]] == ["stacked"] * 4 and summary["batch_trials"] == 2
    assert trainers(out) == ["stacked"] * 4
    best = json.loads((out / tune.BEST_CONFIG_FILE).read_text())
    assert best["lr"] == pytest.approx(summary["best"]["params"]["lr"]) and best["samples"] == 2
    r = CliRunner().invoke(app, ["tune", str(cache), "--batch-trials", "0", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "batch-trials" in r.output
