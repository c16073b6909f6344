"""``dvml evaluate`` (and evaluate_target) on real on-disk caches and run directories, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dvml.cache import CacheSpec, CacheWriter, fingerprint, load_split
from dvml.cli import app
from dvml.evaluate import evaluate_embeddings, evaluate_target
from dvml.extract.synth import SynthConfig, generate

runner = CliRunner()
METRIC_KEYS = ["recall@1", "recall@2", "recall@4", "recall@8", "nmi", "f1", "precision", "recall", "map@r",
               "r_precision"]


@pytest.fixture(scope="module")
def synth_cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tiny.h5"
    generate(SynthConfig(n_classes=16, images_per_class=8, views=2, feature_dim=64, class_dim=16,
                         hidden_dim=32, seed=1), out)
    return out


def _write_cache(path: Path, test_features: np.ndarray, test_labels: np.ndarray, dataset: str = "bench") -> Path:
    d = test_features.shape[-1]
    spec = CacheSpec(dataset=dataset, backbone="none", weights="none", feature_dim=d, views=("centre",),
                     dtype="float32")
    rng = np.random.default_rng(0)
    with CacheWriter(path, spec) as w:
        train_labels = np.array([900, 900, 901, 901])  # disjoint from the test ids
        w.append("train", rng.random((4, 1, d), dtype=np.float32), train_labels)
        w.append("test", test_features.reshape(len(test_labels), 1, d), test_labels)
        w.finalize()
    return path


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.stdout + (result.stderr if result.stderr_bytes is not None else "")


def test_cli_on_a_cache_file_against_evaluate_embeddings(synth_cache, tmp_path):
    out = tmp_path / "m.json"
    result, text = _invoke("evaluate", synth_cache, "--json", out, "--seed", 3)
    assert result.exit_code == 0, text
    for col in ("NMI", "F1", "R@1", "R@8", "MAP@R", "R-prec"):
        assert col in result.stdout
    saved = json.loads(out.read_text())
    assert list(saved)[:len(METRIC_KEYS)] == METRIC_KEYS
    # independent path: raw view-0 test features straight from the reader
    split = load_split(synth_cache, "test", views=[0])
    ref = evaluate_embeddings(split.features[:, 0, :], split.labels, seed=3)
    for key in METRIC_KEYS:
        assert saved[key] == pytest.approx(ref[key], abs=1e-12)
        assert f"{100 * ref[key]:.2f}" in result.stdout or key in ("precision", "recall")
    assert saved["cache_fingerprint"] == fingerprint(synth_cache)
    assert saved["target"] == str(synth_cache.resolve())
    assert saved["n_test"] == split.labels.size and saved["n_classes"] == 8
    assert saved["seed"] == 3 and saved["ks"] == [1, 2, 4, 8] and saved["metric"] == "cosine"
    assert {"dvml", "numpy", "faiss-cpu"} <= set(saved["versions"]) or "faiss-gpu" in saved["versions"]


def test_cli_options_ks_metric_no_clustering(synth_cache, tmp_path):
    out = tmp_path / "m.json"
    result, text = _invoke("evaluate", synth_cache, "--json", out, "--ks", "1,3", "--metric", "euclidean",
                           "--no-clustering")
    assert result.exit_code == 0, text
    saved = json.loads(out.read_text())
    assert "nmi" not in saved and "f1" not in saved
    split = load_split(synth_cache, "test", views=[0])
    ref = evaluate_embeddings(split.features[:, 0, :], split.labels, ks=(1, 3), metric="euclidean",
                              clustering=False)
    assert {k: saved[k] for k in ref} == ref
    assert saved["metric"] == "euclidean" and saved["kmeans_runs"] == 0


def test_kmeans_runs_are_recorded(synth_cache):
    res = evaluate_target(synth_cache, kmeans_runs=2, seed=5)
    split = load_split(synth_cache, "test", views=[0])
    ref = evaluate_embeddings(split.features[:, 0, :], split.labels, kmeans_runs=2, seed=5)
    assert res["nmi"] == pytest.approx(ref["nmi"]) and res["kmeans_runs"] == 2


def test_sop_dataset_defaults_to_sop_ks(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(100, 150), 3)
    path = _write_cache(tmp_path / "sop.h5", rng.normal(size=(150, 8)).astype(np.float32), y, dataset="sop")
    result, text = _invoke("evaluate", path)
    assert result.exit_code == 1
    assert "K=1000 is larger than the set" in text and "sop.h5" in text
    result, text = _invoke("evaluate", path, "--ks", "1,10,100", "--json", tmp_path / "m.json")
    assert result.exit_code == 0, text
    assert json.loads((tmp_path / "m.json").read_text())["ks"] == [1, 10, 100]


def test_singleton_class_is_named(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([10, 10, 11, 11, 12, 13, 13])
    path = _write_cache(tmp_path / "c.h5", rng.normal(size=(7, 4)).astype(np.float32), y)
    result, text = _invoke("evaluate", path, "--ks", "1")
    assert result.exit_code == 1
    assert "c.h5" in text and "fewer than 2 items" in text and "class 12" in text


def test_nan_features_are_an_error_naming_the_file(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    x[4, 1] = np.nan
    path = _write_cache(tmp_path / "nan.h5", x, np.array([1, 1, 2, 2, 3, 3]))
    result, text = _invoke("evaluate", path, "--ks", "1")
    assert result.exit_code == 1
    assert "nan.h5" in text and "NaN" in text


@pytest.mark.parametrize("make", ["missing", "empty_dir", "not_hdf5"])
def test_bad_targets(tmp_path, make):
    target = tmp_path / "t"
    if make == "empty_dir":
        target.mkdir()
    elif make == "not_hdf5":
        target.write_text("hello")
    result, text = _invoke("evaluate", target)
    assert result.exit_code == 1
    assert str(target) in text.replace("\n", "")


def test_bad_ks_option(synth_cache):
    result, text = _invoke("evaluate", synth_cache, "--ks", "1,x")
    assert result.exit_code == 1 and "--ks" in text
