"""``dvml.experiments.analyze``: central features, KS p-values against scipy, relative deviation, outputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dvml.errors import DvmlError
from dvml.experiments.analyze import (
    analyze_embeddings,
    central_features,
    ks_central,
    ks_pvalues_per_dim,
    relative_deviation,
)


def test_central_features_against_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    y = rng.integers(0, 5, 30)
    central, classes, centres = central_features(x, y)
    for i in range(30):
        np.testing.assert_allclose(central[i], x[i] - x[y == y[i]].mean(0))
    np.testing.assert_allclose(centres, [x[y == c].mean(0) for c in classes])
    # central features of every class sum to zero
    for c in classes:
        np.testing.assert_allclose(central[y == c].sum(0), 0, atol=1e-12)


def test_against_scipy_kstest_loop():
    rng = np.random.default_rng(1)
    v = np.column_stack([rng.normal(2, 3, 40), rng.exponential(1, 40), rng.uniform(-1, 1, 40), np.full(40, 0.5)])
    p = ks_pvalues_per_dim(v)
    for d in range(3):
        ref = stats.kstest(v[:, d], "norm", args=stats.norm.fit(v[:, d])).pvalue
        assert p[d] == pytest.approx(ref, rel=1e-9)
    assert np.isnan(p[3])  # constant column: nothing to fit


def test_ks_central_large_on_normal_small_on_non_normal():
    rng = np.random.default_rng(2)
    n_classes, per_class, dim = 12, 60, 16
    y = np.repeat(np.arange(n_classes), per_class)
    centres = rng.normal(0, 5, (n_classes, dim))
    normal = centres[y] + rng.normal(0, 1, (y.size, dim))
    ks = ks_central(normal, y)
    # fitted parameters make the KS test conservative (Lilliefors): p-values pile up well above 0.5
    assert 0.6 < ks.mean < 0.9 and ks.n_classes == n_classes
    assert ks.std < 0.1  # the same distribution in every class: little spread across classes
    # the p-value is roughly uniform-or-larger under the null: rejections at 5% are rare
    per_dim = np.concatenate([ks_pvalues_per_dim(normal[y == c] - normal[y == c].mean(0)) for c in range(n_classes)])
    assert (per_dim < 0.05).mean() < 0.05
    # clearly non-normal: a two-point (bimodal) variation, and heavy-skewed exponential
    bimodal = centres[y] + rng.choice([-1.0, 1.0], (y.size, dim)) + rng.normal(0, 0.05, (y.size, dim))
    assert ks_central(bimodal, y).mean < 0.01
    skewed = centres[y] + rng.exponential(1, (y.size, dim)) ** 2
    assert ks_central(skewed, y).mean < 0.05


def test_ks_central_skips_small_classes_and_refuses_none():
    rng = np.random.default_rng(3)
    y = np.array([0] * 10 + [1] * 3)
    ks = ks_central(rng.normal(size=(13, 4)), y, min_class_size=5)
    assert ks.n_classes == 1 and ks.n_skipped_classes == 1 and np.isnan(ks.std)
    with pytest.raises(DvmlError, match="cannot run the KS test \\(lower min_class_size\\)$"):
        ks_central(rng.normal(size=(13, 4)), y, min_class_size=11)


def test_relative_deviation_by_hand():
    # class 0: centre (2, 0), members at distance 1; class 1: centre (0, 4), members at distance 2
    x = np.array([[2, 1], [2, -1], [0, 6], [0, 2]], dtype=float)
    y = np.array([0, 0, 1, 1])
    rd = relative_deviation(x, y)
    assert rd["per_class"] == {"0": pytest.approx(0.5), "1": pytest.approx(0.5)}
    assert rd["mean"] == pytest.approx(0.5) and rd["std"] == pytest.approx(0.0)
    # shrinking the variation around the same centres lowers it proportionally
    tight = np.array([[2, 0.5], [2, -0.5], [0, 5], [0, 3]], dtype=float)
    assert relative_deviation(tight, y)["mean"] == pytest.approx(0.25)


def test_analyze_embeddings_normalizes_for_cosine():
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(4), 20)
    x = rng.normal(size=(80, 8)) + 3 * np.eye(8)[y]
    scaled = x * rng.uniform(0.5, 5, (80, 1))  # per-sample scale: invisible to cosine retrieval
    a, b = analyze_embeddings(x, y), analyze_embeddings(scaled, y)
    assert a["relative_deviation"]["mean"] == pytest.approx(b["relative_deviation"]["mean"])
    assert a["ks"]["mean"] == pytest.approx(b["ks"]["mean"])
    raw = analyze_embeddings(scaled, y, normalize=False)
    assert raw["relative_deviation"]["mean"] > a["relative_deviation"]["mean"]
    assert a["n"] == 80 and a["dim"] == 8 and a["n_classes"] == 4 and set(a["ks"]["per_class"]) == {"0", "1", "2", "3"}


# --------------------------------------------------------------------------------------------------
# the stage on real run directories


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from dvml.extract.synth import SynthConfig, generate
    from dvml.heads import FitConfig, fit

    root = tmp_path_factory.mktemp("analyze")
    cache = generate(SynthConfig(n_classes=12, images_per_class=8, views=2, feature_dim=32, class_dim=8,
                                 variation_dim=4, hidden_dim=16), root / "w.h5")
    common = dict(cache=cache, loss="triplet", epochs=1, embedding_size=16, decoder_hidden=16, samples=2,
                  batch_size=12, eval_every=0, device="cpu")
    dvml_run = fit(FitConfig(out=root / "dvml", dvml=True, **common))
    base_run = fit(FitConfig(out=root / "base", dvml=False, **common))
    return cache, dvml_run, base_run


def test_run_writes_analysis_and_plots(runs, tmp_path):
    import json

    from dvml.experiments.analyze import ANALYSIS_FILE, AnalyzeConfig, run
    from dvml.heads import embed

    cache, dvml_run, base_run = runs
    steps = []
    result = run(AnalyzeConfig(target=dvml_run, baseline=base_run, out=tmp_path / "a", plot_points=40,
                               plot_classes=4, tsne_iter=250, splits=("test",)), progress=steps.append)
    saved = json.loads((tmp_path / "a" / ANALYSIS_FILE).read_text())
    assert set(saved["splits"]) == {"test"}
    assert set(saved["splits"]["test"]) == {"run", "baseline", "raw"}
    assert saved["sources"]["run"]["dvml"] is True and saved["sources"]["baseline"]["dvml"] is False
    # the numbers are those of the pure functions on the run's own embeddings of the test split (view 0)
    from dvml.cache import load_split

    te = load_split(cache, "test", views=[0])
    expect = analyze_embeddings(embed(dvml_run, te.features[:, 0]), te.labels)
    got = saved["splits"]["test"]["run"]
    assert got["ks"]["mean"] == pytest.approx(expect["ks"]["mean"])
    assert got["relative_deviation"]["mean"] == pytest.approx(expect["relative_deviation"]["mean"])
    assert got["ks"]["n_classes"] == 6 and got["dim"] == 16 and saved["splits"]["test"]["raw"]["dim"] == 32
    for name in ("run", "baseline", "raw"):
        for kind in ("pca", "tsne", "central_tsne"):
            png = tmp_path / "a" / f"test_{name}_{kind}.png"
            assert png.read_bytes()[:4] == b"\x89PNG", png
    assert (tmp_path / "a" / "test_ks_pvalues.png").exists() and len(result["plots"]) == 10
    assert steps  # progress was reported


def test_run_on_a_cache_and_refusals(runs, tmp_path):
    from dvml.experiments.analyze import AnalyzeConfig, run

    cache, dvml_run, _ = runs
    result = run(AnalyzeConfig(target=cache, plots=False, out=tmp_path / "c"))
    assert set(result["splits"]) == {"train", "test"} and result["plots"] == []
    assert set(result["splits"]["train"]) == {"raw"} and result["splits"]["train"]["raw"]["n"] == 48
    with pytest.raises(DvmlError, match="not a run directory"):
        run(AnalyzeConfig(target=dvml_run, baseline=cache, plots=False, out=tmp_path / "d"))
    with pytest.raises(ValueError, match="splits"):
        AnalyzeConfig(target=cache, splits=("val",))
