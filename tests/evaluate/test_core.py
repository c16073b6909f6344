"""dvml.evaluate.evaluate_embeddings: end to end against independent references, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score
from sklearn.neighbors import NearestNeighbors

from dvml.evaluate import EvaluationError, evaluate_embeddings
from dvml.retrieval import knn, metrics


def _clustered(n_classes=15, per_class=8, dim=12, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes) * 7 + 3, per_class)  # non-contiguous label ids
    centres = rng.normal(size=(n_classes, dim)) * 2
    x = centres[np.repeat(np.arange(n_classes), per_class)] + spread * rng.normal(size=(y.size, dim))
    return x.astype(np.float32), y


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_against_sklearn_nearest_neighbors(metric):
    x, y = _clustered()
    got = evaluate_embeddings(x, y, ks=(1, 2, 4, 8), metric=metric, clustering=False)
    r = np.bincount(np.unique(y, return_inverse=True)[1])[np.unique(y, return_inverse=True)[1]] - 1
    k = max(8, int(r.max()))
    nn = NearestNeighbors(n_neighbors=k + 1, metric=metric, algorithm="brute").fit(x)
    _, idx = nn.kneighbors(x)
    # drop self by index (continuous data: no ties)
    idx = np.array([[j for j in row if j != i][:k] for i, row in enumerate(idx)])
    nl = y[idx]
    for kk in (1, 2, 4, 8):
        assert got[f"recall@{kk}"] == pytest.approx(np.mean([(row[:kk] == q).any() for row, q in zip(nl, y,
                                                                                                     strict=True)]))
    assert got["map@r"] == pytest.approx(metrics.map_at_r(nl, y))
    assert got["r_precision"] == pytest.approx(metrics.r_precision(nl, y))
    assert set(got) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"}


def test_clustering_keys_and_nmi_against_sklearn_on_the_same_assignment():
    x, y = _clustered(spread=1.5)
    got = evaluate_embeddings(x, y, seed=4)
    assert list(got) == ["recall@1", "recall@2", "recall@4", "recall@8", "nmi", "f1", "precision", "recall",
                         "map@r", "r_precision"]
    assign = knn.kmeans(x, 15, seed=4)  # what evaluate_embeddings ran (seeded, deterministic)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(y, assign), abs=1e-10)
    assert all(0.0 <= v <= 1.0 for v in got.values())


def test_kmeans_runs_average_over_consecutive_seeds():
    x, y = _clustered(spread=2.0, seed=2)
    got = evaluate_embeddings(x, y, kmeans_runs=3, seed=10)
    nmis = [metrics.nmi(knn.kmeans(x, 15, seed=s), y) for s in (10, 11, 12)]
    f1s = [metrics.pairwise_f1(knn.kmeans(x, 15, seed=s), y)["f1"] for s in (10, 11, 12)]
    assert got["nmi"] == pytest.approx(np.mean(nmis))
    assert got["f1"] == pytest.approx(np.mean(f1s))


def test_separated_classes_score_perfectly():
    x, y = _clustered(spread=0.01)
    got = evaluate_embeddings(x, y, kmeans_runs=1)
    assert got["recall@1"] == 1.0 and got["map@r"] == 1.0 and got["r_precision"] == 1.0


def test_nan_embeddings_are_an_error():
    x, y = _clustered()
    x[5, 2] = np.inf
    with pytest.raises(EvaluationError, match="NaN or infinite.*row 5"):
        evaluate_embeddings(x, y)


def test_singleton_class_is_an_error_naming_it():
    x, y = _clustered()
    y = y.copy()
    y[0] = 999
    with pytest.raises(EvaluationError, match="fewer than 2 items.*999"):
        evaluate_embeddings(x, y)


def test_k_larger_than_the_set_is_an_error():
    x, y = _clustered(n_classes=3, per_class=3)
    with pytest.raises(EvaluationError, match="K=10 is larger than the set"):
        evaluate_embeddings(x, y, ks=(1, 10))


def test_progress_callback_counts_queries_and_runs():
    x, y = _clustered()
    seen: dict[str, list] = {}
    evaluate_embeddings(x, y, kmeans_runs=2, progress=lambda stage, n, total: seen.setdefault(stage, []).append(
        (n, total)))
    assert sum(n for n, _ in seen["kNN"]) == x.shape[0]
    assert seen["k-means"] == [(1, 2), (1, 2)]
