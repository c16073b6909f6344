"""``dvml.experiments.tune``: the study never sees a test class; it continues; its best config feeds fit-heads."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import dvml.cache.reader
from dvml.cache import load_split
from dvml.errors import DvmlError
from dvml.experiments import tune
from dvml.extract.synth import SynthConfig, generate
from dvml.heads import FitConfig

# phase 2 from the start, so the searched λs (the phase-2 weights) act in these 1-epoch fits
FIT = {"epochs": 1, "phase2_epoch": 0, "decoder_hidden": 16, "batch_size": 12, "eval_every": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune") / "w.h5"
    return generate(SynthConfig(n_classes=20, images_per_class=6, views=2, feature_dim=32, class_dim=8,
                                variation_dim=4, hidden_dim=16), path)


@pytest.fixture
def spies(monkeypatch):
    """Record every label array that reaches fit and the objective, and every split read from any cache."""
    seen = {"fit_train": [], "fit_test": [], "objective": [], "embedded": [], "splits_read": []}
    real_fit, real_eval, real_embed, real_load = tune.fit, tune.evaluate_embeddings, tune.embed, load_split

    def fit(cfg, *, train=None, test=None, callback=None):
        assert train is not None and test is not None, "tune must hand fit both splits (else fit reads the cache)"
        seen["fit_train"].append(np.unique(train.labels))
        seen["fit_test"].append(np.unique(test.labels))
        return real_fit(cfg, train=train, test=test, callback=callback)

    def evaluate_embeddings(emb, labels, **kw):
        seen["objective"].append(np.unique(labels))
        return real_eval(emb, labels, **kw)

    def embed(run_dir, features):
        seen["embedded"].append(features.shape[0])
        return real_embed(run_dir, features)

    def load_split_spy(path, split, **kw):
        seen["splits_read"].append(split)
        return real_load(path, split, **kw)

    monkeypatch.setattr(tune, "fit", fit)
    monkeypatch.setattr(tune, "evaluate_embeddings", evaluate_embeddings)
    monkeypatch.setattr(tune, "embed", embed)
    # every module that imported load_split (tune, fit's module, evaluate...) gets the spy
    for mod in list(sys.modules.values()):
        if getattr(mod, "load_split", None) is real_load:
            monkeypatch.setattr(mod, "load_split", load_split_spy)
    monkeypatch.setattr(dvml.cache.reader, "load_split", load_split_spy)
    return seen


def test_split_train_classes_is_disjoint_seeded_and_checked():
    labels = np.repeat(np.arange(10, 22), 3)
    fit_c, val_c = tune.split_train_classes(labels, 0.25, seed=0)
    assert len(val_c) == 3 and len(fit_c) == 9 and not set(fit_c) & set(val_c)
    assert set(fit_c) | set(val_c) == set(range(10, 22))
    again = tune.split_train_classes(labels, 0.25, seed=0)
    assert all((a == b).all() for a, b in zip(again, (fit_c, val_c), strict=True))
    assert not (tune.split_train_classes(labels, 0.25, seed=1)[1] == val_c).all()
    with pytest.raises(DvmlError, match="both need >= 2 \\(change val_fraction\\)$"):
        tune.split_train_classes(np.repeat(np.arange(3), 2), 0.25, seed=0)


def test_study_never_touches_test_classes(cache, tmp_path, spies):
    test_classes = set(np.unique(load_split(cache, "test").labels))
    spies["splits_read"].clear()
    cfg = tune.TuneConfig(cache=cache, loss="triplet", trials=3, out=tmp_path / "t", fit=FIT, seed=0)
    result = tune.run(cfg)
    val = set(result["val_classes"])
    fit_classes = set(result["fit_classes"])
    train_classes = set(np.unique(load_split(cache, "train").labels))
    assert val and fit_classes and not val & fit_classes and val | fit_classes == train_classes
    assert len(spies["fit_train"]) == 3 and len(spies["objective"]) == 3
    for labels in spies["fit_train"]:
        assert set(labels) == fit_classes  # fits on the remaining training classes only
    for labels in spies["fit_test"] + spies["objective"]:
        assert set(labels) == val  # watched and scored on the held-out training classes
    for labels in spies["fit_train"] + spies["fit_test"] + spies["objective"]:
        assert not set(labels) & test_classes
    assert "test" not in spies["splits_read"] and "train" in spies["splits_read"]
    n_val_rows = int(np.isin(load_split(cache, "train").labels, list(val)).sum())
    assert spies["embedded"] == [n_val_rows] * 3
    # the objective is the validation Recall@1 of each trial
    values = [t["value"] for t in result["trials"] if t["state"] == "COMPLETE"]
    assert len(values) == 3 and result["best"]["value"] == max(values)
    assert all(0 <= v <= 1 for v in values)


def test_best_config_feeds_fit_heads_and_study_continues(cache, tmp_path):
    out = tmp_path / "t"
    cfg = tune.TuneConfig(cache=cache, loss="triplet", trials=2, out=out, fit=FIT, seed=1)
    first = tune.run(cfg)
    assert (out / "optuna.db").exists() and not list((out / "trials").glob("*/heads.pt"))  # runs cleaned up
    best = json.loads((out / tune.BEST_CONFIG_FILE).read_text())
    assert "cache" not in best and "out" not in best
    params = first["best"]["params"]
    assert best["lr"] == pytest.approx(params["lr"]) and best["embedding_size"] == params["embedding_size"]
    assert best["samples"] == params["samples"]
    assert best["recon_share"] == pytest.approx(params["recon_share"])  # FitConfig scales λ1 and λ2 by it
    assert best["lambdas_phase2"] == pytest.approx([params[n] for n in tune.LAMBDA_NAMES])
    assert best["epochs"] == 1 and best["loss"] == "triplet" and best["dvml"] is True
    fc = FitConfig.from_dict({**best, "cache": str(cache), "out": str(tmp_path / "run")})
    assert fc.lr == pytest.approx(params["lr"]) and fc.lambdas_phase2 == tuple(best["lambdas_phase2"])
    k = params["recon_share"]
    late = max(fc.phase2_epoch, fc.kl_warmup_epochs)  # phase 2, warm-up done
    assert fc.lambdas(late)[:2] == pytest.approx((k * params["lambda1"], k * params["lambda2"]))
    # asking for more trials continues the same study (SQLite storage) rather than starting over
    more = tune.run(tune.TuneConfig(cache=cache, loss="triplet", trials=3, out=out, fit=FIT, seed=1))
    assert more["study_name"] == first["study_name"]
    assert sum(t["state"] == "COMPLETE" for t in more["trials"]) == 3
    assert [t["number"] for t in more["trials"]][:2] == [t["number"] for t in first["trials"]]
    # the continuation does not replay the first process's random start-up trials
    assert more["trials"][2]["params"] not in [t["params"] for t in first["trials"]]
    assert more["sampler_seed"] != first["sampler_seed"] == 1
    # a study may not silently mix validation splits
    with pytest.raises(DvmlError, match="other classes"):
        tune.run(tune.TuneConfig(cache=cache, loss="triplet", trials=4, out=out, fit=FIT, seed=2,
                                 study_name=first["study_name"]))


def test_baseline_study_searches_no_dvml_parameters(cache, tmp_path):
    cfg = tune.TuneConfig(cache=cache, loss="triplet", dvml=False, trials=1, out=tmp_path, fit=FIT)
    assert tune.search_space(cfg) == ["lr", "margin", "embedding_size"]
    npair = tune.TuneConfig(cache=cache, loss="npair", dvml=False, trials=1, out=tmp_path, fit=FIT)
    assert tune.search_space(npair) == ["lr", "embedding_size"]  # npair has no margin
    dr = tune.TuneConfig(cache=cache, loss="dr-triplet", trials=1, out=tmp_path, fit={**FIT, "margin": 0.3})
    assert tune.search_space(dr) == ["lr", "gamma", *tune.LAMBDA_NAMES, "recon_share", "samples", "embedding_size"]
    fixed = tune.TuneConfig(cache=cache, loss="triplet", trials=1, out=tmp_path, fit={**FIT, "samples": 4},
                            search=("lr", "lambda3"))
    assert tune.search_space(fixed) == ["lr", "lambda3"]
    with pytest.raises(DvmlError, match="cannot search"):
        tune.search_space(tune.TuneConfig(cache=cache, loss="triplet", trials=1, out=tmp_path, fit=FIT,
                                          dvml=False, search=("samples",)))
    with pytest.raises(ValueError, match="set by tune"):
        tune.TuneConfig(cache=cache, fit={"seed": 1})


def test_recon_share_is_its_own_field_and_scales_lambda1_and_lambda2_together():
    """k reaches the fit as ``recon_share`` (recorded as searched), next to the raw λs; FitConfig multiplies the
    phase-2 KL and reconstruction weights by it (their ratio, the variance branch's β, kept)."""
    import optuna

    from dvml.heads.config import PHASE2_LAMBDAS

    space = ["lambda1", "lambda2", "lambda3", "lambda4", "recon_share"]
    trial = optuna.trial.FixedTrial({"lambda1": 0.5, "lambda2": 1.5, "lambda3": 0.2, "lambda4": 0.7,
                                     "recon_share": 8.0})
    p = tune.suggest(trial, space)
    assert p == {"lambdas_phase2": (0.5, 1.5, 0.2, 0.7), "recon_share": 8.0}
    assert tune.params_to_fit(trial.params) == p
    only_k = optuna.trial.FixedTrial({"recon_share": 16.0})
    assert tune.suggest(only_k, ["recon_share"]) == {"recon_share": 16.0}
    assert tune.params_to_fit({"recon_share": 16.0, "lr": 1e-3}) == {"lr": 1e-3, "recon_share": 16.0}
    fc = FitConfig(cache="c.h5", out="o", recon_share=16.0, phase2_epoch=2, kl_warmup_epochs=0)
    want = (16 * PHASE2_LAMBDAS[0], 16 * PHASE2_LAMBDAS[1], PHASE2_LAMBDAS[2], PHASE2_LAMBDAS[3])
    assert fc.lambdas(2.0)[:4] == pytest.approx(want)
