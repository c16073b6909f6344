"""dvml.retrieval.metrics against straightforward loops, brute-force pair counts and scikit-learn."""

from __future__ import annotations

import doctest
import itertools

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from dvml.evaluate import core
from dvml.retrieval import knn, metrics


def _neighbours(seed=0, n=120, classes=12, k=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    y[:classes] = np.arange(classes)
    y[classes:2 * classes] = np.arange(classes)  # every class has >= 2 items
    x = rng.normal(size=(n, 6)) + 1.5 * rng.normal(size=(classes, 6))[y]
    counts = np.bincount(y)
    k = k or int(max(8, counts.max() - 1))
    _, idx = knn.search(x, k)
    return y[idx], y


def _loop_recall(nl, ql, k):
    hits = 0
    for row, q in zip(nl, ql, strict=True):
        if any(row[j] == q for j in range(k)):
            hits += 1
    return hits / len(ql)


def _loop_map_r_and_r_precision(nl, ql):
    aps, rps = [], []
    for row, q in zip(nl, ql, strict=True):
        r = int((ql == q).sum()) - 1
        correct, ap = 0, 0.0
        for i in range(r):
            if row[i] == q:
                correct += 1
                ap += correct / (i + 1)
        aps.append(ap / r)
        rps.append(correct / r)
    return sum(aps) / len(aps), sum(rps) / len(rps)


def _loop_pairs(cluster_ids, labels):
    tp = same_cluster = same_class = 0
    for i, j in itertools.combinations(range(len(labels)), 2):
        sc, sy = cluster_ids[i] == cluster_ids[j], labels[i] == labels[j]
        tp += sc and sy
        same_cluster += sc
        same_class += sy
    p = tp / same_cluster if same_cluster else 0.0
    r = tp / same_class if same_class else 0.0
    return {"f1": 2 * p * r / (p + r) if p + r else 0.0, "precision": p, "recall": r}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_against_loop(seed):
    nl, ql = _neighbours(seed)
    got = metrics.recall_at_k(nl, ql, ks=(1, 2, 4, 8))
    assert list(got) == ["recall@1", "recall@2", "recall@4", "recall@8"]
    for k in (1, 2, 4, 8):
        assert got[f"recall@{k}"] == pytest.approx(_loop_recall(nl, ql, k), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_at_r_and_r_precision_against_loop(seed):
    nl, ql = _neighbours(seed)
    ref_map, ref_rp = _loop_map_r_and_r_precision(nl, ql)
    assert metrics.map_at_r(nl, ql) == pytest.approx(ref_map, abs=1e-12)
    assert metrics.r_precision(nl, ql) == pytest.approx(ref_rp, abs=1e-12)


def test_map_at_r_against_pytorch_metric_learning():
    # a second, independent implementation (PML's AccuracyCalculator, same definition)
    accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    import torch

    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(10), rng.integers(2, 9, size=10))
    x = (rng.normal(size=(y.size, 8)) + 1.2 * rng.normal(size=(10, 8))[y]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # PML's default kNN is L2: on unit vectors it ranks as cosine
    calc = accuracy_calculator.AccuracyCalculator(include=("mean_average_precision_at_r", "r_precision"),
                                                   device=torch.device("cpu"))
    ref = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    got = core.evaluate_embeddings(x, y, ks=(1,), clustering=False)
    assert got["map@r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)
    assert got["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-6)


def test_metrics_need_enough_neighbours():
    nl, ql = _neighbours(0, k=2)
    with pytest.raises(ValueError, match="neighbours"):
        metrics.map_at_r(nl, ql)
    with pytest.raises(ValueError, match="K"):
        metrics.recall_at_k(nl, ql, ks=(4,))


def test_r_zero_is_an_error_naming_the_class():
    with pytest.raises(ValueError, match="single item: 9"):
        metrics.r_precision(np.array([[1], [0], [0]]), np.array([0, 0, 9]))


@pytest.mark.parametrize("seed", range(4))
def test_nmi_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 15, size=400) * 3 + 100  # arbitrary, non-contiguous ids
    clusters = np.where(rng.random(400) < 0.6, labels // 3, rng.integers(0, 20, size=400))
    ref = normalized_mutual_info_score(labels, clusters, average_method="arithmetic")
    assert metrics.nmi(clusters, labels) == pytest.approx(ref, abs=1e-10)


def test_nmi_on_a_faiss_kmeans_assignment_against_sklearn():
    rng = np.random.default_rng(7)
    y = np.repeat(np.arange(20), 10)
    x = rng.normal(size=(200, 16)) + 2 * rng.normal(size=(20, 16))[y]
    assign = knn.kmeans(x, 20, seed=0)
    assert metrics.nmi(assign, y) == pytest.approx(normalized_mutual_info_score(y, assign), abs=1e-10)


def test_nmi_degenerate_partitions():
    assert metrics.nmi(np.zeros(5, int), np.zeros(5, int)) == 1.0
    assert metrics.nmi(np.zeros(5, int), np.arange(5)) == pytest.approx(
        normalized_mutual_info_score(np.arange(5), np.zeros(5, int)), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_pairwise_f1_against_bruteforce_pair_count(seed):
    rng = np.random.default_rng(seed)
    n = 60
    labels = rng.integers(0, 7, size=n)
    clusters = np.where(rng.random(n) < 0.5, labels, rng.integers(0, 9, size=n)) + 1000
    got = metrics.pairwise_f1(clusters, labels)
    ref = _loop_pairs(clusters, labels)
    for key in ("f1", "precision", "recall"):
        assert got[key] == pytest.approx(ref[key], abs=1e-12)


def test_pairwise_f1_all_singletons_is_zero_not_nan():
    got = metrics.pairwise_f1(np.arange(6), np.array([0, 0, 1, 1, 2, 2]))
    assert got == {"f1": 0.0, "precision": 0.0, "recall": 0.0}


def test_contingency_does_not_form_a_dense_table():
    n = 50_000
    c, y = np.arange(n), np.arange(n)[::-1]  # 50k x 50k dense would be 20 GB
    n_ij, a, b = metrics.contingency(c, y)
    assert n_ij.size == n and a.sum() == n and b.sum() == n
    assert metrics.nmi(c, y) == pytest.approx(1.0)


@pytest.mark.parametrize("module", [metrics, knn, core])
def test_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_per_query_values_average_to_the_metrics_and_group_by_class():
    rng = np.random.default_rng(4)
    ql = rng.integers(0, 5, 40)
    nl = rng.integers(0, 5, (40, 12))
    r = np.minimum(np.bincount(ql, minlength=5)[ql], 12)  # any R in [1, k] per query
    r = np.maximum(r, 1)
    hits = metrics.hits_at_k(nl, ql, 3)
    assert hits.tolist() == [bool((row[:3] == q).any()) for row, q in zip(nl, ql, strict=True)]
    assert float(hits.mean()) == metrics.recall_at_k(nl, ql, (3,))["recall@3"]
    ap = metrics.average_precision_at_r(nl, ql, r)
    assert float(np.mean(ap)) == metrics.map_at_r(nl, ql, r)
    grouped = metrics.per_class_means(ql, hit=hits, ap=ap)
    for c, n, h, a in zip(grouped["class"], grouped["count"], grouped["hit"], grouped["ap"], strict=True):
        mine = ql == c
        assert n == mine.sum() and h == pytest.approx(hits[mine].mean()) and a == pytest.approx(ap[mine].mean())
    assert (grouped["count"] * grouped["hit"]).sum() / grouped["count"].sum() == pytest.approx(hits.mean())
    with pytest.raises(ValueError, match="one value per query"):
        metrics.per_class_means(ql, x=np.zeros(3))
